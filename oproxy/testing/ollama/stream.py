"""
How the fake Ollama puts generations on the wire: response shapes with Go's
field order, NDJSON framing, and a generation's run from its first line to
its ``done`` line (paced by :class:`~oproxy.testing.base.pacing.Pacer` on
the injected clock).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oproxy.testing.base.http import respond, write
from oproxy.testing.base.pacing import Pacer
from oproxy.testing.base.stats import ServerStats
from oproxy.testing.ollama.generation import Piece, Plan, context_ids
from oproxy.testing.ollama.wire import go_json, rfc3339_nano, seconds_to_ns

JSON_TYPE: Final = b"application/json; charset=utf-8"
NDJSON_TYPE: Final = b"application/x-ndjson"
TEXT_TYPE: Final = b"text/plain; charset=utf-8"

_LOAD_NS: Final = 15_000_000
_PROMPT_NS_PER_TOKEN: Final = 1_000_000
_EVAL_NS_PER_TOKEN: Final = 10_000_000
_OVERHEAD_NS: Final = 500_000


@dataclass
class GenerationStats(ServerStats[tuple[str, dict[str, Any]]]):
    """
    What the fake Ollama has seen, for tests to assert on (see
    :class:`~oproxy.testing.base.stats.ServerStats`): ``failed`` counts
    generations that ended in a mid-stream error (``broken:latest``), or a
    500 for ``stream: false``; ``requests`` holds ``(path, body)`` of every
    request with a JSON object body.
    """


# --------------------------------------------------------------------------
# Writing


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
        self._pacer = Pacer(
            clock,
            delay,
            steps,
            self._finish,
            self._aborted,
            stall_after=0 if plan.stall else None,
        )

    def start(self) -> Deferred[bytes | None]:
        """
        Count the generation as started and begin emitting.
        """
        self._stats.started += 1
        if self._stream:
            start_ndjson(self._request)
        return self._pacer.start(self._request, load_delay=self._load_delay)

    @property
    def pending(self) -> bool:
        """
        Whether a tick is scheduled.
        """
        return self._pacer.pending

    def abandon(self) -> None:
        """
        End the run as a server going away does: aborted, connection closed.
        """
        self._pacer.abandon()

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
        self._stats.count_tokens(self._shape.model, self._plan.prompt_tokens, self._plan.eval_count)
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
