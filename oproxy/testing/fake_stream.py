"""
How the fake Ollama puts generations on the wire: response shapes with Go's
field order, NDJSON framing, clock-driven pacing and cancellation.

Everything here is scheduled on an injected :class:`IReactorTime`, never on
wall time, so a :class:`twisted.internet.task.Clock` can drive a whole
stream token by token in a unit test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request

from oproxy.testing.fake_generation import Piece, Plan, context_ids
from oproxy.testing.fake_wire import go_json, rfc3339_nano, seconds_to_ns

JSON_TYPE: Final = b"application/json; charset=utf-8"
NDJSON_TYPE: Final = b"application/x-ndjson"
TEXT_TYPE: Final = b"text/plain; charset=utf-8"

_LOAD_NS: Final = 15_000_000
_PROMPT_NS_PER_TOKEN: Final = 1_000_000
_EVAL_NS_PER_TOKEN: Final = 10_000_000
_OVERHEAD_NS: Final = 500_000


@dataclass
class GenerationStats:
    """
    What the fake has seen, for tests to assert on.

    :ivar started: generations (chat/generate requests that got past
        validation and began producing output, including stalled ones).
    :ivar completed: generations that ended with a ``done`` line / body.
    :ivar aborted: generations stopped because the client went away.
    :ivar failed: generations that ended in a mid-stream error
        (``broken:latest``), or a 500 for ``stream: false``.
    :ivar requests: ``(path, body)`` of every request with a JSON object
        body, in arrival order: what the proxy actually sent upstream.
    """

    started: int = 0
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        """
        Generations started and not yet ended.
        """
        return self.started - self.completed - self.aborted - self.failed

    def counters(self) -> dict[str, int]:
        """
        The counters as served by ``GET /_fake/stats``.
        """
        return {
            "started": self.started,
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "requests": len(self.requests),
        }

    def reset(self, in_flight: int = 0) -> None:
        """
        Zero everything in place (tests may hold a reference), keeping the
        generations still running counted as started so ``in_flight`` stays
        right when they end.
        """
        self.started, self.completed, self.aborted, self.failed = in_flight, 0, 0, 0
        self.requests.clear()


# --------------------------------------------------------------------------
# Writing


def write(request: Request, data: bytes) -> None:
    """
    ``request.write`` with a type (Twisted leaves it unannotated).
    """
    request.write(data)  # type: ignore[no-untyped-call]


def respond(request: Request, status: int, content_type: bytes | None, body: bytes) -> bytes:
    """
    Set status, content type and an explicit length, and return ``body``
    for Klein to write: the real server sends small bodies with a
    ``Content-Length`` rather than chunked.
    """
    request.setResponseCode(status)
    if content_type is not None:
        request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    return body


def json_response(request: Request, status: int, value: Any) -> bytes:
    """
    A Go-encoded JSON body with ``application/json; charset=utf-8``.
    """
    return respond(request, status, JSON_TYPE, go_json(value))


def error_response(request: Request, status: int, message: str) -> bytes:
    """
    Ollama's only error shape: ``{"error": message}``.
    """
    return json_response(request, status, {"error": message})


def ndjson_line(value: Any) -> bytes:
    """
    One NDJSON line: the Go-encoded object and a newline.
    """
    return go_json(value) + b"\n"


def start_ndjson(request: Request) -> None:
    """
    Prepare a streamed 200 response; headers leave with the first line.
    """
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"content-type", [NDJSON_TYPE])


# --------------------------------------------------------------------------
# Pacing and cancellation


class Ticker:
    """
    Runs ``steps`` one per tick of ``delay`` seconds on ``clock`` (all at
    once when ``delay`` is 0), then ``finish``; stops at once when the
    client goes away.

    The returned Deferred fires with what ``finish`` returns (a body for
    Klein to write, or ``None`` when the steps wrote it all).  Klein cancels
    it when the connection is lost; the request's ``notifyFinish`` errback
    is watched too, so an abort is noticed whichever comes first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float,
        steps: Sequence[Callable[[], None]],
        finish: Callable[[], bytes | None],
        on_abort: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._steps = steps
        self._finish = finish
        self._on_abort = on_abort
        self._index = 0
        self._started = 0.0
        self._call: IDelayedCall | None = None
        self._over = False
        self.deferred: Deferred[bytes | None] = Deferred(lambda _: self.abort())

    def start(
        self, request: Request, *, stall: bool = False, load_delay: float = 0.0
    ) -> Deferred[bytes | None]:
        """
        Begin after ``load_delay`` seconds, the model's load (unless
        ``stall``: then wait for the client to give up).  Pacing counts
        from the end of the load, as the runner only starts then.
        """
        request.notifyFinish().addErrback(self._lost)
        self._started = self._clock.seconds() + load_delay
        if stall:
            return self.deferred
        if load_delay > 0:
            self._call = self._clock.callLater(load_delay, self._loaded)
        else:
            self._advance()
        return self.deferred

    @property
    def pending(self) -> bool:
        """
        Whether a tick is scheduled.
        """
        return self._call is not None and self._call.active()

    def _lost(self, failure: Failure) -> None:
        self.abort()

    def _advance(self) -> None:
        if self._delay > 0 and self._index < len(self._steps):
            # Due times are counted from the start, not from the last tick,
            # so pacing does not drift and ``Clock.advance(total)`` runs
            # every tick that falls within ``total``.
            due = self._started + self._delay * (self._index + 1)
            wait = max(0.0, due - self._clock.seconds())
            self._call = self._clock.callLater(wait, self._tick)
            return
        while self._index < len(self._steps):
            self._run_step()
        self._over = True
        self.deferred.callback(self._finish())

    def _run_step(self) -> None:
        step = self._steps[self._index]
        self._index += 1
        step()

    def _loaded(self) -> None:
        self._call = None
        if not self._over:
            self._advance()

    def _tick(self) -> None:
        self._call = None
        if self._over:
            return
        self._run_step()
        self._advance()

    def abort(self) -> None:
        """
        Stop: cancel the pending tick and report the abort once.  Does
        nothing after the run has finished.
        """
        if self._over:
            return
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._on_abort()


# --------------------------------------------------------------------------
# Response shapes


def created_at(clock: IReactorTime) -> str:
    """
    ``created_at``: the clock's time in UTC, RFC 3339 with nanoseconds.
    """
    return rfc3339_nano(seconds_to_ns(clock.seconds()))


def metrics(plan: Plan, elapsed_ns: int, load_ns: int = 0) -> dict[str, int]:
    """
    The done-line metrics in Go's field order, zeros omitted.  Durations are
    synthetic (per token) but never less than the time the clock says the
    generation took, so they are non-zero even on a frozen test clock.

    :param load_ns: how long the request waited for its model to load
        (Ollama's ``load_duration`` is that wait); a model already in
        memory reports a small synthetic scheduling time instead.
    """
    prompt_ns = plan.prompt_tokens * _PROMPT_NS_PER_TOKEN
    eval_ns = max(elapsed_ns, plan.eval_count * _EVAL_NS_PER_TOKEN, _EVAL_NS_PER_TOKEN)
    load_ns = load_ns or _LOAD_NS
    values = {
        "total_duration": load_ns + prompt_ns + eval_ns + _OVERHEAD_NS,
        "load_duration": load_ns,
        "prompt_eval_count": plan.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": plan.eval_count,
        "eval_duration": eval_ns,
    }
    return {key: value for key, value in values.items() if value}


def _joined(pieces: Sequence[Piece], attribute: str) -> str:
    return "".join(getattr(piece, attribute) for piece in pieces)


def _logprobs(pieces: Sequence[Piece]) -> list[dict[str, Any]]:
    return [entry for piece in pieces for entry in piece.logprobs]


class ChatShape:
    """
    ``/api/chat`` objects: ``model``, ``created_at``, ``message``, ``done``,
    ``done_reason``, ``logprobs``, then the metrics.
    """

    def __init__(self, model: str) -> None:
        self.model = model

    @staticmethod
    def _message(content: str, thinking: str, calls: Sequence[Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = list(calls)
        return message

    def chunk(self, piece: Piece, now: str) -> dict[str, Any]:
        """
        A ``done: false`` line for one piece.
        """
        out: dict[str, Any] = {
            "model": self.model,
            "created_at": now,
            "message": self._message(piece.content, piece.thinking, piece.tool_calls),
            "done": False,
        }
        if piece.logprobs:
            out["logprobs"] = list(piece.logprobs)
        return out

    def load(self, reason: str, now: str) -> dict[str, Any]:
        """
        The answer to a load (``done_reason: "load"``) or unload request.
        """
        return {
            "model": self.model,
            "created_at": now,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": reason,
        }

    def done(self, plan: Plan, stats: dict[str, int], now: str) -> dict[str, Any]:
        """
        The final streamed line: an empty message, the reason and metrics.
        """
        return {**self.load(plan.done_reason, now), **stats}

    def whole(self, plan: Plan, stats: dict[str, int], now: str) -> dict[str, Any]:
        """
        The ``stream: false`` object: the done line with everything joined.
        """
        calls = [call for piece in plan.pieces for call in piece.tool_calls]
        out: dict[str, Any] = {
            "model": self.model,
            "created_at": now,
            "message": self._message(
                _joined(plan.pieces, "content"), _joined(plan.pieces, "thinking"), calls
            ),
            "done": True,
            "done_reason": plan.done_reason,
        }
        logprobs = _logprobs(plan.pieces)
        if logprobs:
            out["logprobs"] = logprobs
        return {**out, **stats}


class GenerateShape:
    """
    ``/api/generate`` objects: ``model``, ``created_at``, ``response``,
    ``thinking``, ``done``, ``done_reason``, ``context``, the metrics, then
    ``logprobs``.
    """

    def __init__(
        self, model: str, prompt: str = "", context: Sequence[int] = (), raw: bool = False
    ) -> None:
        self.model = model
        self._prompt = prompt
        self._context = list(context)
        self._raw = raw

    def _head(self, response: str, thinking: str, now: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now, "response": response}
        if thinking:
            out["thinking"] = thinking
        return out

    def chunk(self, piece: Piece, now: str) -> dict[str, Any]:
        """
        A ``done: false`` line for one piece.
        """
        out = {**self._head(piece.content, piece.thinking, now), "done": False}
        if piece.logprobs:
            out["logprobs"] = list(piece.logprobs)
        return out

    def load(self, reason: str, now: str) -> dict[str, Any]:
        """
        The answer to a load or unload request.
        """
        return {**self._head("", "", now), "done": True, "done_reason": reason}

    def _tail(self, plan: Plan, stats: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {"done": True, "done_reason": plan.done_reason}
        if not self._raw:
            answer = _joined(plan.pieces, "content")
            out["context"] = context_ids(self._context, self._prompt, answer)
        return {**out, **stats}

    def done(self, plan: Plan, stats: dict[str, int], now: str) -> dict[str, Any]:
        """
        The final streamed line, with ``context`` unless ``raw``.
        """
        return {**self._head("", "", now), **self._tail(plan, stats)}

    def whole(self, plan: Plan, stats: dict[str, int], now: str) -> dict[str, Any]:
        """
        The ``stream: false`` object, response and thinking joined.
        """
        head = self._head(_joined(plan.pieces, "content"), _joined(plan.pieces, "thinking"), now)
        out = {**head, **self._tail(plan, stats)}
        logprobs = _logprobs(plan.pieces)
        if logprobs:
            out["logprobs"] = logprobs
        return out


class Generation:
    """
    One chat or generate run: what each tick writes, how it ends, and the
    counters it moves.

    :param on_end: called once when the run ends in any way (done, error
        or abort), so the server can forget it and refresh ``/api/ps``.
    :param load_delay: seconds until the model is loaded; nothing is
        written before (a client leaving meanwhile aborts the run).
    """

    def __init__(
        self,
        clock: IReactorTime,
        request: Request,
        plan: Plan,
        shape: ChatShape | GenerateShape,
        *,
        stream: bool,
        delay: float,
        stats: GenerationStats,
        on_end: Callable[[Generation], None],
        load_delay: float = 0.0,
    ) -> None:
        self._clock = clock
        self._request = request
        self._plan = plan
        self._shape = shape
        self._stream = stream
        self._stats = stats
        self._on_end = on_end
        self._load_delay = load_delay
        self._load_ns = seconds_to_ns(load_delay)
        self._started_ns = seconds_to_ns(clock.seconds()) + self._load_ns
        self._written = False
        steps = [self._emitter(piece) for piece in plan.pieces]
        self.ticker = Ticker(clock, delay, steps, self._finish, self._aborted)

    def start(self) -> Deferred[bytes | None]:
        """
        Count the generation as started and begin emitting.
        """
        self._stats.started += 1
        if self._stream:
            start_ndjson(self._request)
        return self.ticker.start(self._request, stall=self._plan.stall, load_delay=self._load_delay)

    def _emitter(self, piece: Piece) -> Callable[[], None]:
        def emit() -> None:
            if self._stream:
                line = self._shape.chunk(piece, created_at(self._clock))
                write(self._request, ndjson_line(line))
                self._written = True

        return emit

    def _finish(self) -> bytes | None:
        self._on_end(self)
        if self._plan.error is not None:
            self._stats.failed += 1
            return self._fail(self._plan.error)
        self._stats.completed += 1
        elapsed = seconds_to_ns(self._clock.seconds()) - self._started_ns
        stats = metrics(self._plan, elapsed, self._load_ns)
        now = created_at(self._clock)
        if not self._stream:
            return json_response(self._request, 200, self._shape.whole(self._plan, stats, now))
        write(self._request, ndjson_line(self._shape.done(self._plan, stats, now)))
        return None

    def _fail(self, message: str) -> bytes | None:
        if not self._written:
            return error_response(self._request, 500, message)
        write(self._request, ndjson_line({"error": message}))
        return None

    def _aborted(self) -> None:
        self._stats.aborted += 1
        self._on_end(self)
