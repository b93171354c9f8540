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
:mod:`oproxy.testing.openai.output`).  It shares no code with oproxy's own
translators: a fake that agreed with the proxy by construction would hide
the proxy's mistakes.

Some models misbehave on purpose (see
:data:`~oproxy.testing.openai.models.DEFAULT_OPENAI_MODELS`):
``slow`` streams a token every 50 ms for 100 s, ``stall`` never answers,
``stall-midway`` stops after its first chunks, ``broken`` fails part-way
with an in-band error event (a 500 when not streamed).  :meth:`FakeOpenAI.fail_next`
makes the next requests fail with a chosen status.

Time comes only from the injected clock.  Besides the API the fake serves
``GET /_fake/stats`` (counters, the usage its answers reported, and the
last request's headers and body),
``POST /_fake/reset`` and ``POST /_fake/fail`` (``{"status": 429, "times":
1, "message": ..., "retry_after": ...}``) for tests that run it in another
process: ``python -m oproxy.testing.openai --port N``, or ``twistd``
through :mod:`oproxy.testing.openai.tap`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oproxy.testing.base.http import write
from oproxy.testing.base.pacing import Pacer
from oproxy.testing.base.server import FakeServer, InjectedFailure, Route
from oproxy.testing.openai.models import BROKEN_MESSAGE, DEFAULT_OPENAI_MODELS, FakeOpenAIModel
from oproxy.testing.openai.output import (
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
from oproxy.testing.openai.requests import (
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
from oproxy.testing.openai.wire import (
    DONE,
    FakeOpenAIStats,
    SeenRequest,
    event,
    json_response,
    start_events,
    write_events,
)


class FakeOpenAI(FakeServer[APIError]):
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
    :param stream_usage: whether ``stream_options.include_usage`` is
        honoured (servers that predate it ignore it and send no usage).
    :param list_delay: seconds ``GET /v1/models`` takes to answer (a server
        still starting, a slow hosted listing).

    :ivar stats: counters, tokens and the request log, see
        :class:`FakeOpenAIStats`.
    """

    error_type: ClassVar[type[Exception]] = APIError
    stats: FakeOpenAIStats

    def __init__(
        self,
        clock: IReactorTime,
        *,
        models: Sequence[FakeOpenAIModel] | None = None,
        api_key: str | None = None,
        token_delay: float = 0.0,
        health_status: int | None = 200,
        stream_usage: bool = True,
        list_delay: float = 0.0,
    ) -> None:
        super().__init__(clock, token_delay=token_delay, stats=FakeOpenAIStats())
        self.api_key = api_key
        self.health_status = health_status
        self.stream_usage = stream_usage
        self.list_delay = list_delay
        self._initial = tuple(DEFAULT_OPENAI_MODELS if models is None else models)
        self.models = {model.id: model for model in self._initial}
        self._answers = 0
        self._request_ids = 0

    @classmethod
    def from_command_line(
        cls, clock: IReactorTime, api_key: str | None, token_delay: float
    ) -> Self:
        """
        The fake as ``twistd oproxy-fake-<kind>`` and ``python -m`` start it:
        its defaults, with the command line's key and token delay.
        """
        return cls(clock, api_key=api_key, token_delay=token_delay)

    # ------------------------------------------------------------------
    # Public helpers

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
        self._queue_failure(InjectedFailure(status, message, retry_after), times)

    def reset(self) -> None:
        """Counters and log zeroed, initial models back, no pending failures."""
        super().reset()
        self.models = {model.id: model for model in self._initial}

    def next_request_id(self) -> bytes:
        self._request_ids += 1
        return b"req_%032x" % self._request_ids

    # ------------------------------------------------------------------
    # What a kind of server changes (the fakes in the packages beside this one)

    def read_body(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """
        A checked request body as this server reads it (``route`` is
        ``chat``, ``completions`` or ``embeddings``): a kind refuses, with
        its own error, the fields its server refuses, and drops those it
        ignores.  OpenAI reads the body as it is.
        """
        return body

    def model_name(self, body: dict[str, Any]) -> str:
        """The model a body names; OpenAI requires one."""
        return require_model(body)

    def finish_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        """A whole answer as this server words it (extra fields, missing ones)."""
        return answer

    def stream_steps(
        self, route: str, steps: list[list[dict[str, Any]]]
    ) -> list[list[dict[str, Any]]]:
        """A stream's chunks, by tick, as this server words them."""
        return steps

    def model_entry(self, model: FakeOpenAIModel) -> dict[str, Any]:
        """One model as ``/v1/models`` lists it."""
        return model.entry()

    def error_body(self, error: APIError) -> Any:
        """An error as this server words it: OpenAI's four-key object."""
        return error.body()

    # ------------------------------------------------------------------
    # Routing and the wire format

    def routes(self) -> list[Route]:
        return [
            ("/health", ["GET"], self._health),
            ("/v1/models", ["GET"], self._list_models),
            ("/v1/models/<path:model_id>", ["GET"], self._retrieve_model),
            ("/v1/chat/completions", ["POST"], self._chat),
            ("/v1/completions", ["POST"], self._completions),
            ("/v1/embeddings", ["POST"], self._embeddings),
            ("/_fake/fail", ["POST"], self._fake_fail),
        ]

    def before_routing(self, request: Request) -> bytes | None:
        """
        Log the request, give it an ``x-request-id`` and check the key on
        ``/v1/*``.
        """
        request.responseHeaders.setRawHeaders(b"x-request-id", [self.next_request_id()])
        path = request.path.decode("latin-1")
        if not path.startswith("/_fake/"):
            self.stats.requests.append(SeenRequest.arrived(request, path))
        if path.startswith("/v1/"):
            try:
                check_key(self.api_key, request.getHeader(b"authorization"))
            except APIError as error:
                return self.render_error(request, error)
        return None

    def render_error(self, request: Request, error: APIError) -> bytes:
        for name, value in error.headers.items():
            request.responseHeaders.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
        return json_response(request, error.status, self.error_body(error))

    def json_response(self, request: Request, status: int, value: Any) -> bytes:
        return json_response(request, status, value)

    def not_found(self, request: Request) -> bytes:
        return self._invalid_url(request, 404)

    def not_allowed(self, request: Request) -> bytes:
        return self._invalid_url(request, 405)

    def _invalid_url(self, request: Request, status: int) -> bytes:
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        return self.render_error(request, APIError(status, f"Invalid URL ({method} {path})"))

    # ------------------------------------------------------------------
    # Plain routes

    def _health(self, request: Request) -> bytes:
        if self.health_status is None:
            return self._invalid_url(request, 404)
        if self.health_status == 200:
            return json_response(request, 200, {"status": "ok"})
        return self.render_error(
            request, APIError(self.health_status, "Loading model", type="unavailable_error")
        )

    def _list_models(self, request: Request) -> bytes | Deferred[bytes | None]:
        def listing() -> bytes:
            data = [self.model_entry(model) for model in self.models.values()]
            return json_response(request, 200, {"object": "list", "data": data})

        if self.list_delay <= 0:
            return listing()
        return Pacer(self.clock, self.list_delay, [_nothing], listing, _nothing).start(request)

    def _retrieve_model(self, request: Request, model_id: str) -> bytes:
        return json_response(request, 200, self.model_entry(self.resolve_model(unquote(model_id))))

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

    def resolve_model(self, name: str) -> FakeOpenAIModel:
        """
        The model a request names, or OpenAI's 404; a kind whose server
        serves one model whatever the name (llama.cpp, TGI, TEI) answers
        with that one.
        """
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
        failure = self._take_failure()
        if failure is not None:
            raise injected_error(failure.status, failure.message, failure.retry_after)
        return parse_body(request.content.read() if request.content is not None else b"")

    def _generation(
        self, request: Request, route: str, check: Callable[[Mapping[str, Any]], None]
    ) -> tuple[dict[str, Any], FakeOpenAIModel, bool, bool]:
        """
        A chat or completions request, checked: its body, model, whether it
        streams and whether it wants the usage streamed.
        """
        body = self._inference_body(request)
        name = self.model_name(body)
        check(body)
        stream, include_usage = check_stream(body)
        body = self.read_body(route, body)
        return body, self.resolve_model(name), stream, include_usage and self.stream_usage

    def _head(self, prefix: str, model: str) -> Head:
        self._answers += 1
        return Head(f"{prefix}fake{self._answers:08d}", int(self.clock.seconds()), model)

    # ------------------------------------------------------------------
    # Generation

    def _chat(self, request: Request) -> bytes | Deferred[bytes | None]:
        body, model, stream, include_usage = self._generation(request, "chat", check_chat)
        plan = chat_plan(model.id, body, model.answer_tokens)
        head = self._head("chatcmpl-", model.id)
        usage = plan.usage()
        if not stream:
            ticks = len(plan.pieces) + 2
            whole = lambda: self.finish_answer("chat", chat_completion(head, plan))  # noqa: E731
            return self._run(request, model, ticks, whole, usage)
        steps = self.stream_steps("chat", chat_stream_steps(head, plan, include_usage))
        last = [usage_chunk(head, "chat.completion.chunk", usage)] if include_usage else []
        return self._run_stream(request, model, steps, last, usage)

    def _completions(self, request: Request) -> bytes | Deferred[bytes | None]:
        body, model, stream, include_usage = self._generation(
            request, "completions", check_completion
        )
        plans: list[Plan] = completion_plans(model.id, body, model.answer_tokens)
        head = self._head("cmpl-", model.id)
        usage = total_usage(plans)
        if not stream:
            ticks = max(len(plan.pieces) for plan in plans) + 1
            whole = lambda: self.finish_answer("completions", completion(head, plans))  # noqa: E731
            return self._run(request, model, ticks, whole, usage)
        steps = completion_stream_steps(head, plans)
        last = [usage_chunk(head, "text_completion", usage)] if include_usage else []
        return self._run_stream(request, model, steps, last, usage)

    def _embeddings(self, request: Request) -> bytes:
        body = self._inference_body(request)
        name = self.model_name(body)
        encoding = check_embeddings(body)
        body = self.read_body("embeddings", body)
        model = self.resolve_model(name)
        dimensions = body.get("dimensions") or model.dimensions
        texts = embedding_inputs(body["input"])
        answer = embeddings(model.id, texts, dimensions, encoding)
        self.stats.count_tokens(model.id, answer["usage"]["prompt_tokens"])
        return json_response(request, 200, self.finish_answer("embeddings", answer))

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

    def _ended(self, model: FakeOpenAIModel, usage: Mapping[str, int]) -> APIError | None:
        """
        Count a generation's end: the error a ``broken`` model ends with,
        else completed, with the usage it reports.
        """
        if model.broken_after is not None:
            self.stats.failed += 1
            return APIError(500, BROKEN_MESSAGE, type="server_error")
        self.stats.completed += 1
        self.stats.count_tokens(model.id, usage["prompt_tokens"], usage["completion_tokens"])
        return None

    def _run(
        self,
        request: Request,
        model: FakeOpenAIModel,
        ticks: int,
        whole: Callable[[], Any],
        usage: Mapping[str, int],
    ) -> Deferred[bytes | None]:
        """A ``stream: false`` generation: paced like a stream, answered once."""

        def finish() -> bytes:
            error = self._ended(model, usage)
            if error is not None:
                return self.render_error(request, error)
            return json_response(request, 200, whole())

        return self._pace(request, model, [_nothing] * ticks, finish, stream=False)

    def _run_stream(
        self,
        request: Request,
        model: FakeOpenAIModel,
        steps: Sequence[Sequence[Any]],
        last: Sequence[Any],
        usage: Mapping[str, int],
    ) -> Deferred[bytes | None]:
        """An event stream: one tick per step, then ``last`` and ``[DONE]``."""
        start_events(request)
        if model.broken_after is not None:
            steps = steps[: model.broken_after]

        def finish() -> None:
            error = self._ended(model, usage)
            if error is not None:
                write(request, event(self.error_body(error)))
                return
            write_events(request, last)
            write(request, DONE)

        def emitter(chunks: Sequence[Any]) -> Callable[[], None]:
            return lambda: write_events(request, chunks)

        return self._pace(request, model, [emitter(s) for s in steps], finish, stream=True)


def _nothing() -> None:
    """A tick of a generation that is not streamed."""
