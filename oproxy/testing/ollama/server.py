"""
A faithful fake of Ollama's native REST API, for testing clients and
proxies without a GPU.

The fake reproduces the wire behaviour of the Go server as documented in
``ollama-native-api.md``: field names and order, NDJSON framing, Go's JSON
and error messages, status codes, omitted zero metrics, nanosecond
timestamps, the ``Host`` check.  Its "models" answer deterministically (see
:mod:`oproxy.testing.ollama.generation`), and a few of them misbehave on
purpose (``slow``, ``stall``, ``broken``, ``crash``) so that timeouts,
cancellation and error paths can be tested; ``cold`` takes a while to load,
sending nothing meanwhile, as a model that is not in memory does.

Time comes only from the injected clock: pass a
:class:`twisted.internet.task.Clock` to drive streams token by token.

Model management (``/api/pull``, ``/api/create``, ``/api/push``,
``/api/copy``, ``/api/delete``) changes the catalogue the other routes see;
see :mod:`oproxy.testing.ollama.manage` for what create and push report.

Besides Ollama's routes the fake serves a few of its own, which the real
server does not have: ``GET /_fake/stats`` (the :class:`GenerationStats`
counters as JSON), ``GET /_fake/requests`` (``{"requests": [{"path",
"model"}, ...]}``, what the proxy sent, in order), ``POST /_fake/fail``
(``{"model": NAME, "error": MESSAGE}`` makes one model's runner crash, see
:meth:`FakeOllama.fail_model`, ``"error": null`` mends it; ``{"status": 503,
"message": MESSAGE}`` fails the next request, see
:meth:`FakeOllama.fail_next`) and ``POST /_fake/reset`` (zero the counters,
restore the initial catalogue, unload everything, drop pending failures),
for end-to-end tests that run the fake in another process.

Run it standalone with ``python -m oproxy.testing.ollama --port N``, or
with ``twistd`` through :mod:`oproxy.testing.ollama.tap`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar, Final, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oproxy.testing.base.answers import count_words, embed_vector, raw_embedding
from oproxy.testing.base.http import respond, write
from oproxy.testing.base.pacing import Pacer
from oproxy.testing.base.server import FakeServer, InjectedFailure, Route
from oproxy.testing.ollama.generation import GenerationInput, Options, Plan, build_plan
from oproxy.testing.ollama.gojson import (
    GoJSONError,
    GoType,
    decode_go_struct,
    first_present,
    parse_go_json,
    plain,
)
from oproxy.testing.ollama.manage import (
    NEITHER_FROM_NOR_FILES,
    PULL_MISSING,
    check_create_request,
    create_model,
    files_outcome,
    push_missing,
    push_progress,
)
from oproxy.testing.ollama.models import (
    CRASH_ERROR,
    DEFAULT_MODELS,
    Catalogue,
    FakeModel,
    LoadedModels,
    ModelName,
    pull_progress,
    registry_has,
    registry_model,
)
from oproxy.testing.ollama.requests import (
    CHAT_REQUEST,
    COPY_REQUEST,
    CREATE_REQUEST,
    DELETE_REQUEST,
    EMBED_REQUEST,
    EMBEDDING_REQUEST,
    GENERATE_REQUEST,
    PULL_REQUEST,
    PUSH_REQUEST,
    SHOW_REQUEST,
    RequestError,
    check_format,
    check_top_logprobs,
    embed_inputs,
    host_allowed,
    request_options,
    require_capabilities,
    thinking_enabled,
    version_tuple,
)
from oproxy.testing.ollama.stream import (
    TEXT_TYPE,
    ChatShape,
    GenerateShape,
    Generation,
    GenerationStats,
    created_at,
    error_response,
    json_response,
    ndjson_line,
    start_ndjson,
)
from oproxy.testing.ollama.wire import go_json, go_quote, rfc3339_nano, seconds_to_ns

_Step = dict[str, Any] | Callable[[], None] | RequestError
"""
One step of a progress stream (create, push): a line to send, a change to
make (installing a model) before the next line, or the error that ends it.
"""

_PLAIN_JSON: Final = b"application/json"
"""
What ``streamResponse`` and ``waitForStream`` set before ``c.JSON``, which
then keeps it: their answers carry no ``charset``.
"""


class FakeOllama(FakeServer[RequestError]):
    """
    An in-process fake Ollama server.

    :param clock: where all time comes from (the reactor, or a
        :class:`~twisted.internet.task.Clock` in unit tests).
    :param models: the initial catalogue (default :data:`DEFAULT_MODELS`).
    :param token_delay: seconds between streamed tokens; 0 writes every line
        at once (still one ``write`` per line).
    :param host_check: reject requests whose ``Host`` Ollama would refuse
        (403, empty body).
    :param version: what ``/api/version`` reports.

    :ivar app: the Klein route table.
    :ivar stats: counters, tokens and the request log, see
        :class:`GenerationStats`.
    :ivar models: the installed models, a mutable :class:`Catalogue`.
    :ivar loaded: the models ``/api/ps`` lists.
    """

    error_type: ClassVar[type[Exception]] = RequestError
    stats: GenerationStats

    def __init__(
        self,
        clock: IReactorTime,
        *,
        models: Sequence[FakeModel] | None = None,
        token_delay: float = 0.0,
        host_check: bool = False,
        version: str = "0.12.6",
    ) -> None:
        super().__init__(clock, token_delay=token_delay, stats=GenerationStats())
        self.host_check = host_check
        self.version = version
        self._initial = tuple(DEFAULT_MODELS if models is None else models)
        self.models = Catalogue(self._initial)
        self.loaded = LoadedModels()
        #: When each model that took time to load was (or will be) ready.
        self._ready_at: dict[str, float] = {}
        #: What the pretend registry holds: (repository, blob digest).
        self._pushed: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------
    # Public helpers

    def fail_next(self, status: int, message: str) -> None:
        """
        Make the next inference request (chat, generate, embed, embeddings)
        that passes validation fail with ``status`` and ``{"error":
        message}`` before any byte, as the scheduler does (e.g. ``503
        server busy, please try again.  maximum pending requests
        exceeded``).  Calls queue up, one failure per request.
        """
        self._queue_failure(InjectedFailure(status, message))

    def fail_model(self, name: str, message: str | None = CRASH_ERROR) -> None:
        """
        Make every inference request for the installed model ``name`` fail
        as Ollama does when the model's runner crashes: status 500 and
        ``{"error": message}`` before any byte (by default
        :data:`~oproxy.testing.ollama.models.CRASH_ERROR`), while the
        server's other models answer as usual.  ``None`` mends the model.

        :raises KeyError: no such model is installed.
        """
        model = self.models.find(name)
        if model is None:
            raise KeyError(name)
        self.models.add(replace(model, load_error=message))

    def reset(self) -> None:
        """
        Back to the initial state: counters and request log zeroed, initial
        catalogue restored, nothing loaded, no pending failures.  Running
        generations carry on and are still counted when they end.
        """
        super().reset()
        self.models.replace_all(self._initial)
        self.loaded.clear()
        self._ready_at.clear()
        self._pushed.clear()

    # ------------------------------------------------------------------
    # Routing and the wire format

    def routes(self) -> list[Route]:
        return [
            ("/", ["GET", "HEAD"], self._root),
            ("/api/version", ["GET", "HEAD"], self._version),
            ("/api/tags", ["GET", "HEAD"], self._tags),
            ("/api/ps", ["GET"], self._ps),
            ("/api/chat", ["POST"], self._chat),
            ("/api/generate", ["POST"], self._generate),
            ("/api/embed", ["POST"], self._embed),
            ("/api/embeddings", ["POST"], self._embeddings),
            ("/api/show", ["POST"], self._show),
            ("/api/pull", ["POST"], self._pull),
            ("/api/push", ["POST"], self._push),
            ("/api/create", ["POST"], self._create),
            ("/api/delete", ["DELETE"], self._delete),
            ("/api/copy", ["POST"], self._copy),
            ("/_fake/fail", ["POST"], self._fake_fail),
            ("/_fake/requests", ["GET"], self._fake_requests),
        ]

    def before_routing(self, request: Request) -> bytes | None:
        if self.host_check and not host_allowed(request.getHeader(b"host")):
            return respond(request, 403, None, b"")
        return None

    def render_error(self, request: Request, error: RequestError) -> bytes:
        return error_response(request, error.status, error.message)

    def json_response(self, request: Request, status: int, value: Any) -> bytes:
        return json_response(request, status, value)

    def not_found(self, request: Request) -> bytes:
        return respond(request, 404, b"text/plain", b"404 page not found")

    def not_allowed(self, request: Request) -> bytes:
        return respond(request, 405, b"text/plain", b"405 method not allowed")

    def _read(self, request: Request, path: str, go_type: GoType) -> dict[str, Any]:
        body = request.content.read() if request.content is not None else b""
        try:
            raw = parse_go_json(body)
            if isinstance(raw, dict):
                self.stats.requests.append((path, plain(raw)))
            return decode_go_struct(raw, go_type)
        except GoJSONError as exc:
            raise RequestError(400, str(exc)) from None

    def _now_ns(self) -> int:
        return seconds_to_ns(self.clock.seconds())

    # ------------------------------------------------------------------
    # Plain routes

    def _root(self, request: Request) -> bytes:
        return respond(request, 200, TEXT_TYPE, b"Ollama is running")

    def _version(self, request: Request) -> bytes:
        return json_response(request, 200, {"version": self.version})

    def _tags(self, request: Request) -> bytes:
        models = [m.tag_entry() for m in self.models.newest_first()]
        return json_response(request, 200, {"models": models})

    def _ps(self, request: Request) -> bytes:
        if request.method == b"HEAD":
            return self.not_allowed(request)
        models = [entry.ps_entry() for entry in self.loaded.live(self._now_ns())]
        return json_response(request, 200, {"models": models})

    def _fake_fail(self, request: Request) -> bytes:
        try:
            body = parse_go_json(request.content.read() if request.content is not None else b"")
        except GoJSONError as exc:
            raise RequestError(400, str(exc)) from None
        if not isinstance(body, dict):
            raise RequestError(400, "expected a JSON object")
        model, message = body.get("model"), body.get("error", CRASH_ERROR)
        if isinstance(model, str) and (message is None or isinstance(message, str)):
            try:
                self.fail_model(model, message)
            except KeyError:
                raise RequestError(404, f"model {go_quote(model)} not found") from None
            return json_response(request, 200, {})
        status, message = body.get("status"), body.get("message")
        if isinstance(status, int) and 400 <= status <= 599 and isinstance(message, str):
            self.fail_next(status, message)
            return json_response(request, 200, {})
        raise RequestError(400, 'expected {"model", "error"} or {"status", "message"}')

    def _fake_requests(self, request: Request) -> bytes:
        seen = [{"path": path, "model": body.get("model")} for path, body in self.stats.requests]
        return json_response(request, 200, {"requests": seen})

    # ------------------------------------------------------------------
    # Shared inference steps

    def _find(self, name: str, not_found: str, status: int = 404) -> FakeModel:
        model = self.models.find(name)
        if model is None:
            raise RequestError(status, not_found)
        return model

    def _schedule(self, model: FakeModel, keep_alive: float | None, options: Options) -> float:
        """
        What Ollama's scheduler does before a runner answers: injected
        failures, a crashing runner, then the model counts as loaded.

        :return: seconds until the model is ready: its ``load_delay`` when
            it was not in memory, what is left of a load under way, else 0.
        """
        failure = self._take_failure()
        if failure is not None:
            raise RequestError(failure.status, failure.message or "")
        if model.load_error is not None:
            raise RequestError(500, model.load_error)
        now, key = self.clock.seconds(), model.parsed.key
        in_memory = any(entry.model.parsed.key == key for entry in self.loaded.live(self._now_ns()))
        if not in_memory and model.load_delay > 0:
            self._ready_at[key] = now + model.load_delay
        self.loaded.touch(model, self._now_ns(), keep_alive, options.num_ctx)
        return max(0.0, self._ready_at.get(key, now) - now)

    def _when_loaded(
        self, request: Request, wait: float, answer: Callable[[], bytes]
    ) -> bytes | Deferred[bytes | None]:
        """
        ``answer()`` once ``wait`` seconds of loading are over, sending
        nothing before; a client that leaves meanwhile cancels it.
        """
        if wait <= 0:
            return answer()

        def ready() -> None:
            try:
                body = answer()
            except RequestError as fail:
                body = error_response(request, fail.status, fail.message)
            loaded.callback(body)

        def cancel(_: Deferred[bytes | None]) -> None:
            if call.active():
                call.cancel()

        loaded: Deferred[bytes | None] = Deferred(cancel)
        call = self.clock.callLater(wait, ready)
        return loaded

    # ------------------------------------------------------------------
    # Chat and generate

    def _unload(
        self, request: Request, model: FakeModel, shape: ChatShape | GenerateShape
    ) -> bytes:
        """
        Nothing to say and ``keep_alive: 0``: the model leaves memory.
        """
        self.loaded.unload(model)
        return json_response(request, 200, shape.load("unload", created_at(self.clock)))

    def _load_only(
        self, request: Request, wait: float, shape: ChatShape | GenerateShape
    ) -> bytes | Deferred[bytes | None]:
        """
        Nothing to say: the model is loaded, and the answer says so once it is.
        """

        def answer() -> bytes:
            return json_response(request, 200, shape.load("load", created_at(self.clock)))

        return self._when_loaded(request, wait, answer)

    def _chat(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/chat", CHAT_REQUEST)
        check_top_logprobs(req)
        name: str = req.get("model", "")
        if not name.strip():
            raise RequestError(400, "model is required")
        if not ModelName.parse(name).is_valid():
            raise RequestError(400, "invalid model name")
        model = self._find(name, f"model '{name}' not found")
        messages = [m or {} for m in req.get("messages", [])]
        keep_alive = req.get("keep_alive")
        shape = ChatShape(name)
        if not messages and keep_alive == 0:
            return self._unload(request, model, shape)
        think = thinking_enabled(req, model, name)
        tools = [t or {} for t in req.get("tools", [])]
        require_capabilities(model, name, "chat", ["tools"] if tools else [])
        options = request_options(req)
        wait = self._schedule(model, keep_alive, options)
        if not messages:
            return self._load_only(request, wait, shape)
        check_format(req.get("format"))
        plan = build_plan(self._chat_input(req, model, messages, tools, think, options))
        return self._run(request, req, model, plan, shape, wait)

    @staticmethod
    def _chat_input(
        req: dict[str, Any],
        model: FakeModel,
        messages: list[dict[str, Any]],
        tools: list[Any],
        think: bool,
        options: Options,
    ) -> GenerationInput:
        users = [m for m in messages if m.get("role", "").lower() == "user"]
        said = users[-1].get("content", "") if users else ""
        last = messages[-1]
        is_tool = last.get("role", "").lower() == "tool"
        images = [image for m in messages for image in m.get("images") or () if image is not None]
        return GenerationInput(
            model=model,
            said=said,
            prompt_tokens=count_words(*(m.get("content", "") for m in messages)),
            options=options,
            images=tuple(images),
            tool_result=last.get("content", "") if is_tool else None,
            tools=tuple(tools),
            think=think,
            format=req.get("format"),
            logprobs=req.get("logprobs", False),
            top_logprobs=req.get("top_logprobs", 0),
            seed_text=f"{len(messages)}:{said}",
        )

    def _generate(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/generate", GENERATE_REQUEST)
        check_top_logprobs(req)
        name: str = req.get("model", "")
        model = self._find(name, f"model '{name}' not found")
        prompt: str = req.get("prompt", "")
        keep_alive = req.get("keep_alive")
        context = [c or 0 for c in req.get("context", [])]
        shape = GenerateShape(name, prompt, context, raw=req.get("raw", False))
        if not prompt and keep_alive == 0:
            return self._unload(request, model, shape)
        if req.get("raw") and (req.get("template") or req.get("system") or context):
            raise RequestError(400, "raw mode does not support template, system, or context")
        think = thinking_enabled(req, model, name)
        suffix: str = req.get("suffix", "")
        require_capabilities(model, name, "generate", ["insert"] if suffix else [])
        options = request_options(req)
        wait = self._schedule(model, keep_alive, options)
        if not prompt:
            return self._load_only(request, wait, shape)
        check_format(req.get("format"))
        inp = GenerationInput(
            model=model,
            said=prompt,
            prompt_tokens=count_words(req.get("system", ""), prompt, suffix),
            options=options,
            images=tuple(i for i in req.get("images", []) if i is not None),
            suffix=suffix,
            think=think,
            format=req.get("format"),
            logprobs=req.get("logprobs", False),
            top_logprobs=req.get("top_logprobs", 0),
            seed_text=prompt,
        )
        return self._run(request, req, model, build_plan(inp), shape, wait)

    def _run(
        self,
        request: Request,
        req: dict[str, Any],
        model: FakeModel,
        plan: Plan,
        shape: ChatShape | GenerateShape,
        load_delay: float = 0.0,
    ) -> Deferred[bytes | None]:
        """
        Start a generation: stream it, or pace it and answer once, after
        ``load_delay`` seconds of loading.
        """
        keep_alive: float | None = req.get("keep_alive")

        def ended(generation: Generation) -> None:
            self._running.discard(generation)
            self.loaded.refresh(model, self._now_ns(), keep_alive)

        generation = Generation(
            self.clock,
            request,
            plan,
            shape,
            stream=req.get("stream", True),
            delay=max(self.token_delay, model.min_token_delay),
            stats=self.stats,
            on_end=ended,
            load_delay=load_delay,
        )
        self._running.add(generation)
        return generation.start()

    # ------------------------------------------------------------------
    # Embeddings

    def _embed(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/embed", EMBED_REQUEST)
        inputs = embed_inputs(req.get("input"))
        name: str = req.get("model", "")
        if not ModelName.parse(name).is_valid():
            raise RequestError(404, f"model '{name}' not found")
        model = self._find(name, f"model {go_quote(name)} not found, try pulling it first")
        options = request_options(req)
        wait = self._schedule(model, req.get("keep_alive"), options)
        load_ns = seconds_to_ns(wait) or 1_000_000

        def answer() -> bytes:
            if not inputs:
                return json_response(request, 200, {"model": name, "embeddings": []})
            context = min(options.num_ctx or model.context_length, model.context_length)
            counts = [count_words(text) for text in inputs]
            if req.get("truncate", True) is False and max(counts) > context:
                raise RequestError(400, "the input length exceeds the context length")
            dims = model.embedding_length
            cut = req.get("dimensions", 0)
            vectors = [embed_vector(text, dims, cut) for text in inputs]
            total = sum(min(count, context) for count in counts)
            body = {
                "model": name,
                "embeddings": vectors,
                "total_duration": 1_000_000 + load_ns + 1_000_000 * total,
                "load_duration": load_ns,
                "prompt_eval_count": total,
            }
            self.stats.count_tokens(name, total)
            return json_response(request, 200, body)

        return self._when_loaded(request, wait, answer)

    def _embeddings(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/embeddings", EMBEDDING_REQUEST)
        name: str = req.get("model", "")
        if not ModelName.parse(name).is_valid():
            raise RequestError(400, "model is required")
        model = self._find(name, f"model {go_quote(name)} not found, try pulling it first")
        wait = self._schedule(model, req.get("keep_alive"), request_options(req))
        prompt: str = req.get("prompt", "")
        vector = raw_embedding(prompt, model.embedding_length) if prompt else []
        return self._when_loaded(
            request, wait, lambda: json_response(request, 200, {"embedding": vector})
        )

    # ------------------------------------------------------------------
    # Model management

    def _show(self, request: Request) -> bytes:
        req = self._read(request, "/api/show", SHOW_REQUEST)
        name: str = first_present(req, "model", "name")
        if not name:
            raise RequestError(400, "model is required")
        parsed = ModelName.parse(name)
        if not parsed.is_valid():
            raise RequestError(400, "invalid model name")
        shown = parsed.display if version_tuple(self.version) >= (0, 30) else name
        model = self._find(name, f"model '{shown}' not found")
        body: dict[str, Any] = {"modelfile": model.modelfile()}
        if model.parameters:
            body["parameters"] = model.parameters_text()
        if model.template:
            body["template"] = model.template
        if model.system:
            body["system"] = model.system
        body["details"] = model.details()
        body["model_info"] = model.model_info()
        body["capabilities"] = list(model.capabilities)
        body["modified_at"] = model.modified_at
        return json_response(request, 200, body)

    def _pull(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/pull", PULL_REQUEST)
        name: str = first_present(req, "model", "name")
        parsed = ModelName.parse(name)
        if not parsed.is_valid():
            raise RequestError(400, "invalid model name")
        stream = req.get("stream", True)
        if not registry_has(parsed):
            return self._pull_missing(request, stream)
        present = self.models.find(name) is not None
        model = registry_model(parsed, (*self._initial, *DEFAULT_MODELS), self._modified_now())
        lines = pull_progress(model, already_present=present)

        def finish() -> bytes | None:
            self.models.add(model)
            if stream:
                write(request, ndjson_line({"status": "success"}))
                return None
            return json_response(request, 200, {"status": "success"})

        def step(line: dict[str, Any]) -> Callable[[], None]:
            return lambda: write(request, ndjson_line(line)) if stream else None

        if stream:
            start_ndjson(request)
        pacer = Pacer(self.clock, self.token_delay, [step(x) for x in lines], finish, _nothing)
        return pacer.start(request)

    @staticmethod
    def _pull_missing(request: Request, stream: bool) -> bytes:
        error = "pull model manifest: file does not exist"
        if not stream:
            return error_response(request, 500, error)
        start_ndjson(request)
        write(request, ndjson_line({"status": "pulling manifest"}))
        write(request, ndjson_line({"error": error}))
        return b""

    def _modified_now(self) -> str:
        return rfc3339_nano(self._now_ns())

    def _create(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/create", CREATE_REQUEST)
        check_create_request(req)
        name = ModelName.parse(first_present(req, "model", "name"))
        if not name.is_valid():
            raise RequestError(400, "invalid model name")
        return self._progress(request, req.get("stream", True), self._create_steps(req, name))

    def _create_steps(self, req: dict[str, Any], name: ModelName) -> list[_Step]:
        """
        ``CreateHandler``'s work: a ``from`` model that is not installed is
        pulled first (its progress, ``success`` included, comes first), then
        the new manifest's layers are listed and the model installed.
        """
        source: str = req.get("from", "")
        steps: list[_Step] = []
        if not source:
            if "files" in req:
                lines, error = files_outcome(req.get("files") or {})
                return [*lines, error]
            return [RequestError(400, NEITHER_FROM_NOR_FILES)]
        parsed = ModelName.parse(source)
        if not parsed.is_valid():
            return [RequestError(400, "invalid model name")]
        base = self.models.find(source)
        if base is None:
            if not registry_has(parsed):
                return [{"status": "pulling manifest"}, RequestError(500, PULL_MISSING)]
            known = (*self._initial, *DEFAULT_MODELS)
            base = registry_model(parsed, known, self._modified_now())
            steps += pull_progress(base, already_present=False)
            steps += [partial(self.models.add, base), {"status": "success"}]
        blobs = {layer.digest for model in (*self.models, base) for layer in model.blob_layers()}
        try:
            model, lines = create_model(base, name, req, blobs, self._modified_now())
        except RequestError as fail:
            return [*steps, fail]
        return [*steps, *lines, partial(self.models.add, model), {"status": "success"}]

    def _push(self, request: Request) -> bytes | Deferred[bytes | None]:
        req = self._read(request, "/api/push", PUSH_REQUEST)
        name: str = first_present(req, "model", "name")
        if not name:
            raise RequestError(400, "model is required")
        steps: list[_Step] = [{"status": "retrieving manifest"}]
        model = self.models.find(name)
        if model is None:
            fail = RequestError(500, push_missing(name))
            steps += [{"status": "couldn't retrieve manifest"}, fail]
        else:
            lines, uploaded = push_progress(model, self._pushed)
            steps += [*lines, partial(self._pushed.update, uploaded), {"status": "success"}]
        return self._progress(request, req.get("stream", True), steps)

    def _progress(
        self, request: Request, stream: bool, steps: Sequence[_Step]
    ) -> bytes | Deferred[bytes | None]:
        """
        Send progress the way Ollama's ``streamResponse`` does (one line a
        tick; an error before any line is an HTTP error, after one it is the
        last line) or, for ``"stream": false``, its ``waitForStream`` (the
        last line alone, or the error with its status, 500 by default).
        """
        errors = [i for i, step in enumerate(steps) if isinstance(step, RequestError)]
        end = cast(RequestError, steps[errors[0]]) if errors else None
        steps = steps[: errors[0]] if errors else steps
        if end is not None and not any(isinstance(step, dict) for step in steps):
            return respond(request, end.status, _PLAIN_JSON, go_json({"error": end.message}))
        ticks: list[Callable[[], None]] = []
        effects: list[Callable[[], None]] = []
        latest: list[dict[str, Any]] = [{"status": ""}]
        for step in steps:
            if isinstance(step, dict):
                ticks.append(partial(self._progress_line, request, stream, step, effects, latest))
                effects = []
            elif not isinstance(step, RequestError):
                effects.append(step)

        def finish() -> bytes | None:
            for effect in effects:
                effect()
            if end is not None:
                if stream:
                    write(request, ndjson_line({"error": end.message}))
                    return None
                return respond(request, end.status, _PLAIN_JSON, go_json({"error": end.message}))
            return None if stream else respond(request, 200, _PLAIN_JSON, go_json(latest[0]))

        if stream:
            start_ndjson(request)
        return Pacer(self.clock, self.token_delay, ticks, finish, _nothing).start(request)

    @staticmethod
    def _progress_line(
        request: Request,
        stream: bool,
        line: dict[str, Any],
        effects: Sequence[Callable[[], None]],
        latest: list[dict[str, Any]],
    ) -> None:
        for effect in effects:
            effect()
        latest[0] = line
        if stream:
            write(request, ndjson_line(line))

    def _delete(self, request: Request) -> bytes:
        req = self._read(request, "/api/delete", DELETE_REQUEST)
        name: str = first_present(req, "model", "name")
        if not name:
            raise RequestError(400, "model is required")
        if not ModelName.parse(name).is_valid():
            raise RequestError(400, f"name {go_quote(name)} is invalid")
        model = self._find(name, f"model '{name}' not found")
        self.models.remove(model)
        return respond(request, 200, None, b"")

    def _copy(self, request: Request) -> bytes:
        req = self._read(request, "/api/copy", COPY_REQUEST)
        source: str = req.get("source", "")
        destination: str = req.get("destination", "")
        if not ModelName.parse(source).is_valid():
            raise RequestError(400, f"source {go_quote(source)} is invalid")
        target = ModelName.parse(destination)
        if not target.is_valid():
            raise RequestError(400, f"destination {go_quote(destination)} is invalid")
        model = self._find(source, f"model {go_quote(source)} not found")
        copied = replace(model, name=target.display, modified_at=self._modified_now())
        self.models.add(copied)
        return respond(request, 200, None, b"")


def _nothing() -> None:
    """
    No-op abort hook for streams that are not generations.
    """
