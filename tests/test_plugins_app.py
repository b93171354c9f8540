"""
Plugins in the running proxy, on loopback with the fake Ollama: each hook
where the pipeline and the relays call it, on the OpenAI routes and the
native ones, with the cache, through a reload, and in the stop's order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from oproxy.config import APIKey, AuthConfig, Config, ConfigError, PluginConfig
from oproxy.config.resolving import read_plugins
from oproxy.errors import InvalidRequest
from oproxy.plugins.discovery import installed
from oproxy.plugins.host import PluginHost
from oproxy.plugins.interface import (
    Environment,
    Exchange,
    IChunkHook,
    ICompletionHook,
    IPluginFactory,
    IRequestHook,
    IResponseHook,
    Outcome,
    PluginFactory,
)
from oproxy.reload import Reloader
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy
from tests.conftest import Proxy
from tests.httputil import header, post_json, sse_events
from tests.test_native import ndjson
from tests.test_service import FakeSite, Journal, build, run_until

JSON = dict[str, Any]


def chat(content: str, **more: Any) -> JSON:
    return {"model": "llama3.2", "messages": [{"role": "user", "content": content}], **more}


# -- test plugins -------------------------------------------------------------------


@attrs.frozen
class ShoutOptions:
    word: str = ""


@implementer(IResponseHook, IChunkHook)
class Shout:
    """Upper-cases answers, whole and streamed; ends a stream at ``word``."""

    def __init__(self, options: ShoutOptions | None = None) -> None:
        self.word = options.word if options is not None else ""

    def on_response(self, exchange: Exchange, answer: JSON) -> None:
        for choice in answer.get("choices", []):
            choice["message"]["content"] = choice["message"]["content"].upper()
        if "message" in answer:
            answer["message"]["content"] = answer["message"]["content"].upper()

    def on_chunk(self, exchange: Exchange, chunk: JSON | None) -> Any:
        if chunk is None:
            return None
        if exchange.api == "openai":
            places = [c["delta"] for c in chunk.get("choices", [])]
        else:
            places = [chunk["message"]] if "message" in chunk else []
        for place in places:
            text = place.get("content") or ""
            if self.word and self.word in text:
                raise InvalidRequest("the stream said the word", code="word_said")
            place["content"] = text.upper()
        return None


@implementer(IRequestHook, ICompletionHook)
class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[Exchange, JSON]] = []
        self.outcomes: list[tuple[Exchange, Outcome]] = []

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        self.requests.append((exchange, dict(body)))

    def on_complete(self, exchange: Exchange, outcome: Outcome) -> None:
        self.outcomes.append((exchange, outcome))


@implementer(IRequestHook)
class Deterministic:
    """Makes every chat deterministic (so cacheable)."""

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        body["temperature"] = 0


@attrs.frozen
class FaultOptions:
    how: str = "fail"


@implementer(IRequestHook)
class Fault:
    def __init__(self, options: FaultOptions) -> None:
        self.how = options.how

    def on_request(self, exchange: Exchange, body: JSON) -> Any:
        if self.how == "fail":
            raise RuntimeError("broken plugin")
        return defer.Deferred()  # hangs


RECORDER = Recorder()

FACTORIES = [
    PluginFactory("shout", lambda options, env: Shout(options), options=ShoutOptions),
    PluginFactory("recorder", lambda options, env: RECORDER),
    PluginFactory("deterministic", lambda options, env: Deterministic()),
    PluginFactory("fault", lambda options, env: Fault(options), options=FaultOptions),
]


def find(name: str) -> IPluginFactory:
    own = {f.name: f for f in FACTORIES}
    return own[name] if name in own else installed().find(name)


def plugins(*entries: JSON) -> tuple[PluginConfig, ...]:
    return read_plugins(list(entries), find)


@pytest.fixture(autouse=True)
def fresh_recorder() -> None:
    RECORDER.requests.clear()
    RECORDER.outcomes.clear()


async def call(proxy: Proxy, path: str, body: JSON, **headers: str) -> tuple[Any, bytes]:
    return await post_json(proxy.client, f"{proxy.url}{path}", body, headers)


def content(raw: bytes) -> str:
    answer = orjson.loads(raw)
    return str(answer["choices"][0]["message"]["content"])


def streamed_text(raw: bytes) -> str:
    return "".join(
        (e["choices"][0]["delta"].get("content") or "")
        for e in sse_events(raw)
        if isinstance(e, dict) and e.get("choices")
    )


# -- the request hook ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_hooks_change_what_the_model_is_asked(proxy_factory: Any) -> None:
    proxy = proxy_factory(plugins=plugins({"name": "pii-redact"}, {"name": "recorder"}))
    _, raw = await call(proxy, "/v1/chat/completions", chat("mail me at jo@example.com"))
    assert content(raw).startswith("You said: mail me at [EMAIL].")
    _, raw = await call(proxy, "/api/chat", {**chat("card 4111 1111 1111 1111"), "stream": False})
    assert orjson.loads(raw)["message"]["content"].startswith("You said: card [CARD].")
    _, raw = await call(proxy, "/api/generate", {"model": "llama3.2", "prompt": "x@y.io"})
    assert ndjson(raw)[0]["response"]  # a stream, its words redacted before they were sent
    said = "".join(line.get("response", "") for line in ndjson(raw))
    assert "[EMAIL]" in said and "x@y.io" not in said
    # The recorder comes after the redaction, and knows the route and its family.
    routes = [(x.route, x.api, x.model) for x, _ in RECORDER.requests]
    assert routes == [
        ("/v1/chat/completions", "openai", "llama3.2"),
        ("/api/chat", "ollama", "llama3.2"),
        ("/api/generate", "ollama", "llama3.2"),
    ]
    assert RECORDER.requests[0][1]["messages"][0]["content"] == "mail me at [EMAIL]"


@pytest_twisted.ensureDeferred
async def test_a_refusal_is_written_in_the_routes_dialect(proxy_factory: Any) -> None:
    proxy = proxy_factory(
        plugins=plugins({"name": "block-words", "config": {"patterns": ["secret plan"]}})
    )
    response, raw = await call(proxy, "/v1/chat/completions", chat("the SECRET plan"))
    assert response.code == 400
    error = orjson.loads(raw)["error"]
    assert error["code"] == "content_blocked" and error["type"] == "invalid_request_error"
    response, raw = await call(proxy, "/api/chat", chat("the secret plan"))
    assert response.code == 400
    assert orjson.loads(raw) == {"error": "The request was refused: it mentions a blocked topic."}
    assert proxy.fake.stats.requests == []  # nothing reached the model
    response, _ = await call(proxy, "/v1/chat/completions", chat("a public plan"))
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_plugins_apply_where_their_filters_say(proxy_factory: Any) -> None:
    keys = AuthConfig(
        keys=(
            APIKey(name="alice", sha256=hash_key("sk-alice"), policy=KeyPolicy()),
            APIKey(name="bob", sha256=hash_key("sk-bob"), policy=KeyPolicy()),
        )
    )
    proxy = proxy_factory(
        auth=keys,
        plugins=plugins(
            {"name": "max-tokens-cap", "config": {"max_tokens": 2}, "keys": ["alice"]},
            {"name": "recorder", "routes": ["/api/*"], "models": ["llama3*"]},
        ),
    )
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
    _, raw = await call(proxy, "/v1/chat/completions", chat("tell me a long story"), **alice)
    capped = orjson.loads(raw)
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 2
    _, raw = await call(proxy, "/v1/chat/completions", chat("tell me a long story"), **bob)
    assert orjson.loads(raw)["choices"][0]["finish_reason"] == "stop"
    assert RECORDER.requests == []  # not an /api/ route
    await call(proxy, "/api/chat", {**chat("hi"), "stream": False}, **bob)
    await call(proxy, "/api/chat", {**chat("hi"), "model": "qwen3", "stream": False}, **bob)
    assert [(x.key, x.model) for x, _ in RECORDER.requests] == [("bob", "llama3.2")]


@pytest_twisted.ensureDeferred
async def test_key_management_is_not_the_plugins_business(proxy_factory: Any) -> None:
    root = APIKey(name="root", sha256=hash_key("sk-root"), policy=KeyPolicy(admin=True))
    proxy = proxy_factory(auth=AuthConfig(keys=(root,)), plugins=plugins({"name": "recorder"}))
    response, _ = await call(proxy, "/admin/keys", {"name": "ci"}, Authorization="Bearer sk-root")
    assert response.code == 201
    await proxy.settled()
    assert RECORDER.requests == [] and RECORDER.outcomes == []
    await call(
        proxy, "/api/pull", {"model": "llama3.2", "stream": False}, Authorization="Bearer sk-root"
    )
    assert [x.route for x, _ in RECORDER.requests] == ["/api/pull"]


# -- answers and chunks -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_response_hooks_change_whole_answers(proxy_factory: Any) -> None:
    proxy = proxy_factory(plugins=plugins({"name": "shout"}))
    _, raw = await call(proxy, "/v1/chat/completions", chat("hello there"))
    assert content(raw) == "YOU SAID: HELLO THERE. THIS IS A FAKE ANSWER FROM LLAMA3.2."
    _, raw = await call(proxy, "/api/chat", {**chat("hello"), "stream": False})
    assert orjson.loads(raw)["message"]["content"].startswith("YOU SAID: HELLO.")


@pytest_twisted.ensureDeferred
async def test_chunk_hooks_change_every_chunk_of_both_framings(proxy_factory: Any) -> None:
    proxy = proxy_factory(plugins=plugins({"name": "shout"}))
    _, raw = await call(proxy, "/v1/chat/completions", chat("hello there", stream=True))
    assert streamed_text(raw) == "YOU SAID: HELLO THERE. THIS IS A FAKE ANSWER FROM LLAMA3.2."
    assert sse_events(raw)[-1] == "[DONE]"
    _, raw = await call(proxy, "/api/chat", chat("hello"))
    lines = ndjson(raw)
    assert "".join(line["message"]["content"] for line in lines).startswith("YOU SAID: HELLO.")
    assert lines[-1]["done"] is True


@pytest_twisted.ensureDeferred
async def test_a_chunk_hook_ends_a_stream_with_an_error_event(proxy_factory: Any) -> None:
    proxy = proxy_factory(plugins=plugins({"name": "shout", "config": {"word": "fake"}}))
    response, raw = await call(proxy, "/v1/chat/completions", chat("hello", stream=True))
    assert response.code == 200
    events = sse_events(raw)
    assert events[-1] == {
        "error": {
            "message": "the stream said the word",
            "type": "invalid_request_error",
            "param": None,
            "code": "word_said",
        }
    }
    assert "[DONE]" not in events
    assert streamed_text(raw) == "YOU SAID: HELLO. THIS IS A"
    _, raw = await call(proxy, "/api/chat", chat("hello"))
    assert ndjson(raw)[-1] == {"error": "the stream said the word"}


@pytest_twisted.ensureDeferred
async def test_answers_are_redacted_across_chunk_boundaries(proxy_factory: Any) -> None:
    proxy = proxy_factory(
        plugins=plugins({"name": "pii-redact", "config": {"requests": False, "answers": True}})
    )
    said = "card 4111 1111 1111 1111 thanks"
    _, raw = await call(proxy, "/v1/chat/completions", chat(said, stream=True))
    pieces = [
        e["choices"][0]["delta"].get("content") or ""
        for e in sse_events(raw)
        if isinstance(e, dict) and e.get("choices")
    ]
    assert "".join(pieces).startswith("You said: card [CARD] thanks.")
    assert not any(digit in piece for piece in pieces for digit in "4111")
    _, raw = await call(proxy, "/api/chat", chat(said))
    native = "".join(line["message"]["content"] for line in ndjson(raw))
    assert native.startswith("You said: card [CARD] thanks.")
    # The model did see the number: only its answer was redacted.
    _, raw = await call(proxy, "/v1/chat/completions", chat(said))
    assert content(raw).startswith("You said: card [CARD] thanks.")


# -- completion ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_completion_hooks_learn_how_each_request_ended(proxy_factory: Any) -> None:
    proxy = proxy_factory(plugins=plugins({"name": "recorder"}))
    await call(proxy, "/v1/chat/completions", chat("hello", stream=True))
    assert RECORDER.outcomes == []  # not before the answer is sent
    await proxy.settled()
    await call(proxy, "/v1/chat/completions", {"model": "nonesuch", "messages": []})
    await proxy.settled()
    (first, streamed), (_, failed) = RECORDER.outcomes
    assert (streamed.status, streamed.streamed, streamed.error) == (200, True, None)
    assert streamed.completion_tokens and streamed.prompt_tokens
    assert streamed.backend == "local" and streamed.model == "llama3.2"
    assert streamed.first_token_seconds is not None and streamed.seconds > 0
    assert first.route == "/v1/chat/completions"
    assert (failed.status, failed.error, failed.streamed) == (404, "model_not_found", False)


# -- failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "on_error", "status", "code"),
    [
        ("fail", "reject", 500, "plugin_failed"),
        ("hang", "reject", 500, "plugin_timeout"),
        ("fail", "skip", 200, None),
        ("hang", "skip", 200, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_failing_plugin_rejects_or_is_skipped(
    proxy_factory: Any, how: str, on_error: str, status: int, code: str | None
) -> None:
    entry = {"name": "fault", "config": {"how": how}, "on_error": on_error, "timeout": 0.2}
    proxy = proxy_factory(plugins=plugins(entry))
    response, raw = await call(proxy, "/v1/chat/completions", chat("hi"))
    assert response.code == status
    if code is not None:
        assert orjson.loads(raw)["error"]["code"] == code
        response, raw = await call(proxy, "/api/chat", chat("hi"))
        assert response.code == 500 and "fault" in orjson.loads(raw)["error"]
    else:
        assert content(raw).startswith("You said: hi.")


# -- the cache -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_cache_keys_the_changed_body_and_stores_the_backends_answer(
    proxy_factory: Any,
) -> None:
    proxy = proxy_factory(plugins=plugins({"name": "deterministic"}, {"name": "shout"}))
    body = chat("is this cached?")  # no temperature: cacheable only as the plugin made it
    first, first_raw = await call(proxy, "/v1/chat/completions", body)
    second, second_raw = await call(proxy, "/v1/chat/completions", body)
    assert (header(first, "x-cache"), header(second, "x-cache")) == ("MISS", "HIT")
    # Upper-cased once each time: the cache kept what the backend said.
    assert content(first_raw) == content(second_raw) == content(first_raw).upper()
    streamed = chat("is this streamed and cached?", stream=True)
    first, first_raw = await call(proxy, "/v1/chat/completions", streamed)
    await proxy.settled()
    second, second_raw = await call(proxy, "/v1/chat/completions", streamed)
    assert header(second, "x-cache") == "HIT"
    assert streamed_text(first_raw) == streamed_text(second_raw)
    assert streamed_text(second_raw) == streamed_text(second_raw).upper()


# -- no plugins: nothing at all --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_plugins_the_request_path_makes_nothing(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a request without plugins made a Hooks")

    monkeypatch.setattr("oproxy.web.pipeline.Hooks", never)
    assert proxy.app.services.plugins == ()
    response, _ = await call(proxy, "/v1/chat/completions", chat("hi", stream=True))
    assert response.code == 200
    response, _ = await call(proxy, "/api/chat", chat("hi"))
    assert response.code == 200


# -- reloads -------------------------------------------------------------------------


@implementer(IRequestHook)
class Slow:
    """Holds each request until released: one in flight across a reload."""

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred[None]] = []

    def on_request(self, exchange: Exchange, body: JSON) -> defer.Deferred[None]:
        held: defer.Deferred[None] = defer.Deferred()
        self.waiting.append(held)
        return held


@pytest_twisted.ensureDeferred
async def test_a_reload_swaps_the_plugins_and_a_request_in_flight_keeps_its_own(
    proxy_factory: Any,
) -> None:
    slow = Slow()
    FACTORIES.append(PluginFactory("slow", lambda options, env: slow))
    try:
        proxy = proxy_factory(plugins=plugins({"name": "slow"}, {"name": "shout"}))
        app = proxy.app
        configs: list[Config] = []
        reloader = Reloader(
            app,
            lambda: configs[-1],
            lambda config: app.router,
            lambda config: app.cache,
            retire_cache=lambda cache: None,
        )
        in_flight = defer.ensureDeferred(call(proxy, "/v1/chat/completions", chat("before")))
        while not slow.waiting:
            await task.deferLater(reactor, 0.01, lambda: None)
        configs.append(attrs.evolve(app.config, plugins=()))
        assert reloader.reload()
        assert app.services.plugins == ()
        _, raw = await call(proxy, "/v1/chat/completions", chat("after"))
        assert content(raw).startswith("You said: after.")  # no plugin now
        slow.waiting[0].callback(None)
        _, raw = await in_flight
        assert content(raw).startswith("YOU SAID: BEFORE.")  # the chain it began with
        configs.append(attrs.evolve(app.config, plugins=plugins({"name": "shout"})))
        assert reloader.reload()
        _, raw = await call(proxy, "/v1/chat/completions", chat("again"))
        assert content(raw).startswith("YOU SAID: AGAIN.")
    finally:
        FACTORIES.pop()


@implementer(ICompletionHook)
class Stateful(service.Service):
    """A plugin with state: a service of the process."""

    def __init__(self, journal: list[str], tag: str) -> None:
        self.journal = journal
        self.tag = tag

    def on_complete(self, exchange: Exchange, outcome: Outcome) -> None:
        self.journal.append(f"{self.tag} completed")

    def startService(self) -> None:
        super().startService()
        self.journal.append(f"{self.tag} started")

    def stopService(self) -> None:
        super().stopService()
        self.journal.append(f"{self.tag} stopped")


@attrs.frozen
class TagOptions:
    tag: str


def test_a_plugin_whose_options_are_unchanged_survives_a_reload() -> None:
    journal: list[str] = []
    built: list[Stateful] = []

    def make(options: TagOptions, environment: Environment) -> Stateful:
        built.append(Stateful(journal, options.tag))
        return built[-1]

    stateful = PluginFactory("stateful", make, options=TagOptions)

    def entries(*tags: str, **given: Any) -> tuple[PluginConfig, ...]:
        listed = [{"name": "stateful", "config": {"tag": t}, **given} for t in tags]
        return read_plugins(listed, {"stateful": stateful}.__getitem__)

    host = PluginHost(Environment(clock=MemoryReactorClock(), http=None, metrics=None))  # type: ignore[arg-type]
    host.commit(host.build(entries("a", "b")))
    host.startService()
    assert journal == ["a started", "b started"]
    first = [e.plugin for e in host.chain]
    # New filters and on_error for "a", "b" gone, "c" new.
    host.commit(host.build(entries("a", "c", keys=["alice"], on_error="skip")))
    assert host.chain[0].plugin is first[0] and host.chain[0].settings.keys == ("alice",)
    assert journal == ["a started", "b started", "b stopped", "c started"]
    assert len(built) == 3
    stopping = host.stopService()
    assert stopping.called
    assert journal[-2:] == ["c stopped", "a stopped"]


def test_a_plugin_that_cannot_be_built_is_a_configuration_error() -> None:
    def broken(options: Any, environment: Environment) -> object:
        raise ValueError("no such device")

    factory = PluginFactory("broken", broken)
    found = {"broken": factory, "pii-redact": installed().find("pii-redact")}
    listed = read_plugins([{"name": "pii-redact"}, {"name": "broken"}], found.__getitem__)
    host = PluginHost(Environment(clock=MemoryReactorClock(), http=None, metrics=None))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as raised:
        host.build(listed)
    assert str(raised.value) == "plugins[1]: the plugin 'broken' cannot be built: no such device"
    assert host.chain == ()


# -- the stop's order ---------------------------------------------------------------------


def test_plugins_stop_after_the_last_completion_hooks_and_before_the_pool_closes() -> None:
    journal = Journal()
    reactor_ = MemoryReactorClock()
    top = build(journal, reactor_, FakeSite(journal))
    host = PluginHost(Environment(clock=reactor_, http=None, metrics=None))  # type: ignore[arg-type]
    plugin = Stateful(journal, "webhook")
    listed = read_plugins(
        [{"name": "stateful"}],
        {"stateful": PluginFactory("stateful", lambda options, env: plugin)}.__getitem__,
    )
    host.commit(host.build(listed))
    top.resources = dataclasses.replace(top.resources, plugins=host)
    top.privilegedStartService()
    top.startService()
    assert "webhook started" in journal
    top.resources.after_send(lambda: journal.append("last answer counted"))
    stopping = top.stopService()
    run_until(reactor_, stopping)
    order = [e for e in journal if e in ("last answer counted", "webhook stopped", "pool closed")]
    assert order == ["last answer counted", "webhook stopped", "pool closed"]
