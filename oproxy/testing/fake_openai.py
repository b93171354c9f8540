"""
A faithful fake of an OpenAI-compatible server (OpenAI, vLLM, llama.cpp's
server, LM Studio), for testing clients and proxies without a GPU.

It serves ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``,
``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST
/v1/embeddings`` with OpenAI's exact shapes: data-only SSE ending in
``data: [DONE]``, ``stream_options.include_usage`` (``"usage": null`` on
every chat chunk, then a last chunk with no choices and the usage), the
four-key error object with OpenAI's statuses, types and codes, and an
optional bearer key.  Everything it emits validates against OpenAI's
published schemas.  Answers are deterministic (see
:mod:`oproxy.testing.fake_openai_output`).

Some models misbehave on purpose (see :data:`DEFAULT_OPENAI_MODELS`):
``slow`` streams a token every 50 ms for 100 s, ``stall`` never answers,
``stall-midway`` stops after its first chunks, ``broken`` fails part-way
with an in-band error event (a 500 when not streamed).  :meth:`FakeOpenAI.fail_next`
makes the next requests fail with a chosen status.

Time comes only from the injected clock.  Besides the API the fake serves
``GET /_fake/stats`` (counters and the last request's headers and body),
``POST /_fake/reset`` and ``POST /_fake/fail`` (``{"status": 429, "times":
1, "message": ..., "retry_after": ...}``) for tests that run it in another
process: ``python -m oproxy.testing.fake_openai --port N``.
"""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import unquote

import orjson
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from oproxy.testing.fake_openai_output import (
    Head,
    Plan,
    chat_completion,
    chat_plan,
    chat_stream_steps,
    completion,
    completion_plans,
    completion_stream_steps,
    embedding_inputs,
    embeddings,
    total_usage,
    usage_chunk,
)
from oproxy.testing.fake_openai_requests import (
    APIError,
    check_chat,
    check_completion,
    check_embeddings,
    check_key,
    check_stream,
    injected_error,
    parse_body,
    require_model,
)
from oproxy.testing.fake_openai_wire import (
    DONE,
    FakeOpenAIStats,
    Pacer,
    SeenRequest,
    error_response,
    event,
    json_response,
    start_events,
    write_events,
)
from oproxy.testing.fake_stream import write
from oproxy.testing.running import serve_forever

__all__ = ["DEFAULT_OPENAI_MODELS", "FakeOpenAI", "FakeOpenAIModel", "FakeOpenAIStats", "main"]

BROKEN_MESSAGE: Final = "The model crashed while generating (fake failure)."


@dataclass(frozen=True)
class FakeOpenAIModel:
    """
    One model the fake serves.

    :ivar token_delay: seconds between streamed chunks (at least).
    :ivar answer_tokens: answers are padded to this many tokens (`` token12``
        and so on), so that a slow model's stream lasts.
    :ivar stall_after: chunks sent before the model stops for good (0: not
        even the headers); ``None``: it never stalls.
    :ivar broken_after: chunks sent before it fails with an in-band error
        event (a 500 when not streamed); ``None``: it never fails.
    :ivar dimensions: the length of its embeddings.
    """

    id: str
    owned_by: str = "fake"
    created: int = 1_700_000_000
    token_delay: float = 0.0
    answer_tokens: int = 0
    stall_after: int | None = None
    broken_after: int | None = None
    dimensions: int = 16

    def entry(self) -> dict[str, Any]:
        """The model object of ``/v1/models``."""
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


DEFAULT_OPENAI_MODELS: Final = (
    FakeOpenAIModel("gpt-fake"),
    FakeOpenAIModel("org/fake-7b-instruct", owned_by="org"),
    FakeOpenAIModel("embed-fake", dimensions=8),
    FakeOpenAIModel("slow", token_delay=0.05, answer_tokens=2000),
    FakeOpenAIModel("stall", stall_after=0),
    FakeOpenAIModel("stall-midway", stall_after=2),
    FakeOpenAIModel("broken", broken_after=3),
)


@dataclass(frozen=True)
class _Failure:
    status: int
    message: str | None
    retry_after: float | None


class _FakeRoot(Resource):
    """
    Logs each request, gives it an ``x-request-id``, checks the key on
    ``/v1/*``, then routes with Klein.
    """

    isLeaf = True

    def __init__(self, fake: FakeOpenAI) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fake = fake
        self._routes = fake.app.resource()

    def render(self, request: IRequest) -> bytes | int:
        req = cast(Request, request)
        req.responseHeaders.removeHeader(b"server")
        req.responseHeaders.setRawHeaders(b"x-request-id", [self._fake.next_request_id()])
        path = req.path.decode("latin-1")
        if not path.startswith("/_fake/"):
            self._fake.stats.requests.append(_seen(req, path))
        if path.startswith("/v1/"):
            try:
                check_key(self._fake.api_key, req.getHeader(b"authorization"))
            except APIError as error:
                return error_response(req, error)
        return cast(int, self._routes.render(request))  # always NOT_DONE_YET


def _seen(request: Request, path: str) -> SeenRequest:
    raw = request.content.read() if request.content is not None else b""
    if request.content is not None:
        request.content.seek(0)
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    headers = {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }
    method = request.method.decode("latin-1")
    return SeenRequest(method=method, path=path, headers=headers, body=body)


_Handler = Callable[..., "bytes | Deferred[bytes | None]"]


class FakeOpenAI:
    """
    An in-process fake OpenAI-compatible server.

    :param clock: where all time comes from (the reactor, or a
        :class:`~twisted.internet.task.Clock`).
    :param models: what it serves (default :data:`DEFAULT_OPENAI_MODELS`).
    :param api_key: when set, ``/v1/*`` needs ``Authorization: Bearer`` it.
    :param token_delay: seconds between streamed chunks for every model.
    :param health_status: what ``GET /health`` answers: 200, an error status
        (503 while "loading"), or ``None`` for a server without the route
        (OpenAI, LM Studio).

    :ivar stats: counters and the request log, see :class:`FakeOpenAIStats`.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        models: Sequence[FakeOpenAIModel] | None = None,
        api_key: str | None = None,
        token_delay: float = 0.0,
        health_status: int | None = 200,
    ) -> None:
        self.clock = clock
        self.api_key = api_key
        self.token_delay = token_delay
        self.health_status = health_status
        self.stats = FakeOpenAIStats()
        self._initial = tuple(DEFAULT_OPENAI_MODELS if models is None else models)
        self.models = {model.id: model for model in self._initial}
        self._failures: deque[_Failure] = deque()
        self._running: set[Pacer] = set()
        self._answers = 0
        self._request_ids = 0
        self.app = Klein()
        self._add_routes()

    # ------------------------------------------------------------------
    # Public helpers

    def resource(self) -> IResource:
        """The resource to serve, e.g. ``Site(fake.resource())``."""
        return _FakeRoot(self)

    def fail_next(
        self,
        status: int,
        message: str | None = None,
        *,
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """
        Make the next ``times`` inference requests (chat, completions,
        embeddings) fail with ``status`` before any byte, with the error
        OpenAI sends for it (429 ``rate_limit_exceeded`` with
        ``retry-after``, 5xx ``server_error``, ...).
        """
        for _ in range(times):
            self._failures.append(_Failure(status, message, retry_after))

    def reset(self) -> None:
        """Counters and log zeroed, initial models back, no pending failures."""
        self.stats.reset(in_flight=len(self._running))
        self.models = {model.id: model for model in self._initial}
        self._failures.clear()

    def pending_timers(self) -> int:
        """Running generations with a tick scheduled (0 once all ended)."""
        return sum(1 for run in self._running if run.pending)

    def next_request_id(self) -> bytes:
        self._request_ids += 1
        return b"req_%032x" % self._request_ids

    # ------------------------------------------------------------------
    # Routing

    def _add_routes(self) -> None:
        routes: list[tuple[str, list[str], _Handler]] = [
            ("/health", ["GET"], self._health),
            ("/v1/models", ["GET"], self._list_models),
            ("/v1/models/<path:model_id>", ["GET"], self._retrieve_model),
            ("/v1/chat/completions", ["POST"], self._chat),
            ("/v1/completions", ["POST"], self._completions),
            ("/v1/embeddings", ["POST"], self._embeddings),
            ("/_fake/stats", ["GET"], self._fake_stats),
            ("/_fake/reset", ["POST"], self._fake_reset),
            ("/_fake/fail", ["POST"], self._fake_fail),
        ]
        for path, methods, handler in routes:
            self.app.route(path, methods=methods, endpoint=path)(self._guarded(handler))
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    @staticmethod
    def _guarded(handler: _Handler) -> _Handler:
        def endpoint(request: Request, **arguments: str) -> bytes | Deferred[bytes | None]:
            try:
                return handler(request, **arguments)
            except APIError as error:
                return error_response(request, error)

        return endpoint

    @staticmethod
    def _invalid_url(request: Request, status: int) -> bytes:
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        return error_response(request, APIError(status, f"Invalid URL ({method} {path})"))

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._invalid_url(cast(Request, request), 404)

    def _not_allowed(self, request: IRequest, failure: Failure | None = None) -> bytes:
        return self._invalid_url(cast(Request, request), 405)

    # ------------------------------------------------------------------
    # Plain routes

    def _health(self, request: Request) -> bytes:
        if self.health_status is None:
            return self._invalid_url(request, 404)
        if self.health_status == 200:
            return json_response(request, 200, {"status": "ok"})
        return error_response(
            request, APIError(self.health_status, "Loading model", type="unavailable_error")
        )

    def _list_models(self, request: Request) -> bytes:
        data = [model.entry() for model in self.models.values()]
        return json_response(request, 200, {"object": "list", "data": data})

    def _retrieve_model(self, request: Request, model_id: str) -> bytes:
        return json_response(request, 200, self._model(unquote(model_id)).entry())

    def _fake_stats(self, request: Request) -> bytes:
        return json_response(request, 200, self.stats.counters())

    def _fake_reset(self, request: Request) -> bytes:
        self.reset()
        return json_response(request, 200, {})

    def _fake_fail(self, request: Request) -> bytes:
        body = parse_body(request.content.read() if request.content is not None else b"")
        status = body.get("status")
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise APIError(400, "status must be an HTTP error status", param="status")
        self.fail_next(
            status,
            body.get("message"),
            times=int(body.get("times", 1)),
            retry_after=body.get("retry_after"),
        )
        return json_response(request, 200, {})

    # ------------------------------------------------------------------
    # Shared steps

    def _model(self, name: str) -> FakeOpenAIModel:
        model = self.models.get(name)
        if model is None:
            raise APIError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return model

    def _inference_body(self, request: Request) -> dict[str, Any]:
        """The body of an inference request, after any injected failure."""
        if self._failures:
            failure = self._failures.popleft()
            raise injected_error(failure.status, failure.message, failure.retry_after)
        return parse_body(request.content.read() if request.content is not None else b"")

    def _head(self, prefix: str, model: str) -> Head:
        self._answers += 1
        return Head(f"{prefix}fake{self._answers:08d}", int(self.clock.seconds()), model)

    # ------------------------------------------------------------------
    # Generation

    def _chat(self, request: Request) -> bytes | Deferred[bytes | None]:
        body = self._inference_body(request)
        name = require_model(body)
        check_chat(body)
        stream, include_usage = check_stream(body)
        model = self._model(name)
        plan = chat_plan(model.id, body, model.answer_tokens)
        head = self._head("chatcmpl-", model.id)
        if not stream:
            return self._run(
                request, model, len(plan.pieces) + 2, lambda: chat_completion(head, plan)
            )
        steps = chat_stream_steps(head, plan, include_usage)
        usage = [usage_chunk(head, "chat.completion.chunk", plan.usage())] if include_usage else []
        return self._run_stream(request, model, steps, usage)

    def _completions(self, request: Request) -> bytes | Deferred[bytes | None]:
        body = self._inference_body(request)
        name = require_model(body)
        check_completion(body)
        stream, include_usage = check_stream(body)
        model = self._model(name)
        plans: list[Plan] = completion_plans(model.id, body, model.answer_tokens)
        head = self._head("cmpl-", model.id)
        if not stream:
            ticks = max(len(plan.pieces) for plan in plans) + 1
            return self._run(request, model, ticks, lambda: completion(head, plans))
        steps = completion_stream_steps(head, plans)
        usage = [usage_chunk(head, "text_completion", total_usage(plans))] if include_usage else []
        return self._run_stream(request, model, steps, usage)

    def _embeddings(self, request: Request) -> bytes:
        body = self._inference_body(request)
        name = require_model(body)
        encoding = check_embeddings(body)
        model = self._model(name)
        dimensions = body.get("dimensions") or model.dimensions
        texts = embedding_inputs(body["input"])
        return json_response(request, 200, embeddings(model.id, texts, dimensions, encoding))

    def _pace(
        self,
        request: Request,
        model: FakeOpenAIModel,
        steps: Sequence[Callable[[], None]],
        finish: Callable[[], bytes | None],
        *,
        stream: bool,
    ) -> Deferred[bytes | None]:
        """Run a generation, counting how it starts and ends."""

        def aborted() -> None:
            self._running.discard(pacer)
            self.stats.aborted += 1
            if stream:
                self.stats.aborted_streams += 1

        def finished() -> bytes | None:
            self._running.discard(pacer)
            return finish()

        pacer = Pacer(
            self.clock,
            max(self.token_delay, model.token_delay),
            steps,
            finished,
            aborted,
            stall_after=model.stall_after,
        )
        self.stats.started += 1
        self._running.add(pacer)
        return pacer.start(request)

    def _run(
        self, request: Request, model: FakeOpenAIModel, ticks: int, whole: Callable[[], Any]
    ) -> Deferred[bytes | None]:
        """A ``stream: false`` generation: paced like a stream, answered once."""

        def finish() -> bytes:
            if model.broken_after is not None:
                self.stats.failed += 1
                error = APIError(500, BROKEN_MESSAGE, type="server_error")
                return error_response(request, error)
            self.stats.completed += 1
            return json_response(request, 200, whole())

        return self._pace(request, model, [_nothing] * ticks, finish, stream=False)

    def _run_stream(
        self,
        request: Request,
        model: FakeOpenAIModel,
        steps: Sequence[Sequence[Any]],
        usage: Sequence[Any],
    ) -> Deferred[bytes | None]:
        """An event stream: one tick per step, then usage and ``[DONE]``."""
        start_events(request)
        if model.broken_after is not None:
            steps = steps[: model.broken_after]

        def finish() -> None:
            if model.broken_after is not None:
                self.stats.failed += 1
                error = APIError(500, BROKEN_MESSAGE, type="server_error")
                write(request, event(error.body()))
                return
            self.stats.completed += 1
            write_events(request, usage)
            write(request, DONE)

        def emitter(chunks: Sequence[Any]) -> Callable[[], None]:
            return lambda: write_events(request, chunks)

        return self._pace(request, model, [emitter(s) for s in steps], finish, stream=True)


def _nothing() -> None:
    """A tick of a generation that is not streamed."""


# --------------------------------------------------------------------------
# Standalone server


def main(argv: Sequence[str] | None = None) -> None:
    """
    Serve the fake on ``127.0.0.1:PORT`` with the real reactor, printing
    one ``listening on`` line (with the actual port, useful with
    ``--port 0``).
    """
    parser = argparse.ArgumentParser(prog="python -m oproxy.testing.fake_openai")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--no-health", action="store_true", help="serve no /health route")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = FakeOpenAI(
        cast(IReactorTime, reactor),
        api_key=args.api_key,
        token_delay=args.token_delay,
        health_status=None if args.no_health else 200,
    )
    serve_forever(reactor, fake.resource(), args.port, args.interface, "fake openai")


if __name__ == "__main__":
    main()
