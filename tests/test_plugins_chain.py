"""
One request's run through the plugins (:mod:`oproxy.plugins.chain`), in
memory, with the clock driven by hand: order, filters, the four hooks in
every form they may take (a value, a Deferred, a coroutine), timeouts,
failures (``reject`` and ``skip``), refusals, and chunks changed, dropped,
multiplied, held back and cut off with an error.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs
from zope.interface import implementer

from oproxy.config import PluginConfig
from oproxy.errors import InvalidRequest, OProxyError, PluginFailed
from oproxy.metrics import Metrics
from oproxy.plugins.chain import Enabled, Hooks, Pending
from oproxy.plugins.interface import (
    Exchange,
    IChunkHook,
    ICompletionHook,
    IRequestHook,
    IResponseHook,
    Outcome,
)

JSON = dict[str, Any]


def enabled(
    plugin: object, name: str = "p", pending: Pending | None = None, **given: Any
) -> Enabled:
    return Enabled.of(
        PluginConfig(name=name, **given), plugin, pending if pending is not None else Pending()
    )


def run(
    *chain: Enabled,
    clock: task.Clock | None = None,
    metrics: Metrics | None = None,
    route: str = "/v1/chat/completions",
    api: str = "openai",
    key: str | None = "alice",
) -> Hooks:
    return Hooks(
        tuple(chain),
        clock or task.Clock(),
        metrics or Metrics(CollectorRegistry()),
        route=route,
        api=api,
        key=key,
        request_id="req_test",
        started=12.5,
    )


def started(*chain: Enabled, **given: Any) -> Hooks:
    """Hooks whose request phase has run (deciding which plugins apply)."""
    hooks = run(*chain, **given)
    result(defer.Deferred.fromCoroutine(hooks.request(body())))
    return hooks


def result(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (its failure raised)."""
    assert d.called, "the Deferred has not fired"
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], defer.Failure):  # type: ignore[attr-defined]
        outcome[0].raiseException()
    return outcome[0]


def body(content: str = "hello", model: str = "llama3.2") -> JSON:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def chunk(text: str, index: int = 0, finish: str | None = None) -> JSON:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}],
    }


async def source(*chunks: JSON) -> AsyncGenerator[JSON, None]:
    for each in chunks:
        yield each


async def collect(chunks: AsyncGenerator[JSON, None]) -> list[JSON]:
    return [each async for each in chunks]


def texts(chunks: list[JSON]) -> list[str]:
    return [c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices")]


@implementer(IRequestHook)
class Tag:
    """Appends its tag to the last message; remembers what it saw."""

    def __init__(self, tag: str, model: str | None = None) -> None:
        self.tag = tag
        self.model = model
        self.seen: list[Exchange] = []

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        self.seen.append(exchange)
        body["messages"][-1]["content"] += self.tag
        if self.model is not None:
            body["model"] = self.model


@implementer(IRequestHook, IResponseHook, IChunkHook, ICompletionHook)
class Behaving:
    """Each hook does what it is told: return a value, a Deferred, a coroutine, fail or hang."""

    def __init__(self, how: str, only: str | None = None) -> None:
        self.how = how
        self.only = only
        self.completed: list[Outcome] = []
        self.hanging: list[defer.Deferred[Any]] = []

    def _act(self, value: Any, phase: str) -> Any:
        if self.how == "value" or self.only not in (None, phase):
            return value
        if self.how == "deferred":
            return defer.succeed(value)
        if self.how == "coroutine":

            async def later() -> Any:
                return value

            return later()
        if self.how == "fail":
            raise RuntimeError("the plugin broke")
        if self.how == "refuse":
            raise InvalidRequest("no, thank you", code="refused_by_plugin")
        if self.how == "wrong":
            return "not a JSON object"
        assert self.how == "hang"
        hanging: defer.Deferred[Any] = defer.Deferred()
        self.hanging.append(hanging)
        return hanging

    def on_request(self, exchange: Exchange, body: JSON) -> Any:
        return self._act({**body, "seen": True}, "request")

    def on_response(self, exchange: Exchange, answer: JSON) -> Any:
        return self._act({**answer, "seen": True}, "response")

    def on_chunk(self, exchange: Exchange, chunk: JSON | None) -> Any:
        if chunk is None:
            return None
        return self._act({**chunk, "seen": True}, "chunk")

    def on_complete(self, exchange: Exchange, outcome: Outcome) -> Any:
        self.completed.append(outcome)
        return self._act(None, "complete")


@pytest.fixture
def logged() -> Iterator[list[Any]]:
    with capturedLogs() as events:
        yield events


def failures(events: list[Any]) -> list[Any]:
    return [e for e in events if e.get("log_failure") is not None]


# -- order and filters ---------------------------------------------------------------


def test_request_hooks_run_in_order_each_seeing_the_changes_before_it() -> None:
    first, second = Tag("-1"), Tag("-2")
    hooks = run(enabled(first, "one"), enabled(second, "two"))
    changed = result(defer.Deferred.fromCoroutine(hooks.request(body("hi"))))
    assert changed["messages"][-1]["content"] == "hi-1-2"
    assert [e.plugin for e, _ in hooks.active] == [first, second]
    # Each plugin has an exchange of its own, with what it needs to know.
    one, two = first.seen[0], second.seen[0]
    assert one is not two and one.state is not two.state
    assert (one.route, one.api, one.key, one.request_id, one.started) == (
        "/v1/chat/completions",
        "openai",
        "alice",
        "req_test",
        12.5,
    )


def test_a_filter_sees_the_model_the_plugins_before_it_chose() -> None:
    renaming = Tag("", model="qwen3")
    only_llama, only_qwen = Tag("-llama"), Tag("-qwen")
    hooks = run(
        enabled(renaming, "rename"),
        enabled(only_llama, "l", models=("llama*",)),
        enabled(only_qwen, "q", models=("qwen*",)),
    )
    changed = result(defer.Deferred.fromCoroutine(hooks.request(body("x", model="llama3.2"))))
    assert changed["messages"][-1]["content"] == "x-qwen"
    assert not only_llama.seen
    # Every exchange ends with the model the request goes on with.
    assert {x.model for _, x in hooks.active} == {"qwen3"}


@pytest.mark.parametrize(
    ("given", "route", "key", "model", "applies"),
    [
        ({}, "/api/chat", None, None, True),
        ({"routes": ("/v1/*",)}, "/v1/completions", "bob", "m", True),
        ({"routes": ("/v1/*",)}, "/api/chat", "bob", "m", False),
        ({"routes": ("/api/chat", "/api/generate")}, "/api/generate", "bob", "m", True),
        ({"keys": ("alice", "ci-*")}, "/api/chat", "ci-7", "m", True),
        ({"keys": ("alice",)}, "/api/chat", "bob", "m", False),
        ({"keys": ("alice",)}, "/api/chat", None, "m", False),
        ({"models": ("llama3*",)}, "/api/chat", None, "llama3.2:latest", True),
        ({"models": ("llama3*",)}, "/api/chat", None, "qwen3", False),
        ({"models": ("llama3*",)}, "/api/chat", None, None, False),
        ({"routes": ("/v1/*",), "keys": ("a",), "models": ("m",)}, "/v1/x", "a", "m", True),
        ({"routes": ("/v1/*",), "keys": ("a",), "models": ("m",)}, "/v1/x", "a", "n", False),
    ],
)
def test_filters(
    given: dict[str, Any], route: str, key: str | None, model: str | None, applies: bool
) -> None:
    entry = enabled(Tag(""), **given)
    assert entry.applies(route, key, model) is applies
    assert entry.applies(route, key, model) is applies  # the route's answer is remembered


def test_a_request_no_plugin_applies_to_has_no_active_plugin() -> None:
    hooks = run(enabled(Tag("!"), keys=("admin",)), key="alice")
    given = body("hi")
    assert result(defer.Deferred.fromCoroutine(hooks.request(given))) is given
    assert given["messages"][-1]["content"] == "hi"
    assert hooks.active == []


def test_a_plugin_with_no_hook_cannot_be_enabled() -> None:
    with pytest.raises(TypeError, match="provides none of"):
        enabled(object())


# -- the forms of a result, failures and timeouts ---------------------------------------


@pytest.mark.parametrize("how", ["value", "deferred", "coroutine"])
def test_each_hook_may_return_a_value_a_deferred_or_a_coroutine(how: str) -> None:
    plugin = Behaving(how)
    hooks = run(enabled(plugin))
    assert result(defer.Deferred.fromCoroutine(hooks.request(body())))["seen"] is True
    assert result(defer.Deferred.fromCoroutine(hooks.response({"id": "x"})))["seen"] is True
    streamed = hooks.stream(source(chunk("a"), chunk("b")))
    assert all(c["seen"] for c in result(defer.Deferred.fromCoroutine(collect(streamed))))
    hooks.complete(Outcome(status=200))
    assert plugin.completed == [Outcome(status=200)]


@pytest.mark.parametrize("phase", ["request", "response", "chunk"])
def test_a_failing_plugin_that_rejects_refuses_the_request(phase: str, logged: list[Any]) -> None:
    metrics = Metrics(CollectorRegistry())
    plugin = enabled(Behaving("fail", only=phase), "breaks", on_error="reject")
    hooks = run(plugin, metrics=metrics) if phase == "request" else started(plugin, metrics=metrics)
    running = {
        "request": lambda: hooks.request(body()),
        "response": lambda: hooks.response({"id": "x"}),
        "chunk": lambda: collect(hooks.stream(source(chunk("a")))),
    }[phase]
    with pytest.raises(PluginFailed) as raised:
        result(defer.Deferred.fromCoroutine(running()))
    assert raised.value.status == 500 and raised.value.code == "plugin_failed"
    assert "'breaks' failed" in raised.value.message
    assert "broke" not in raised.value.message  # the details stay in the log
    [event] = failures(logged)
    assert event["plugin"] == "breaks" and event["hook"] == f"on_{phase}"
    assert event["request_id"] == "req_test" and event["route"] == "/v1/chat/completions"
    assert event["log_failure"].check(RuntimeError)
    assert metrics.plugin_failures.labels("breaks", f"on_{phase}", "error")._value.get() == 1


def test_a_failing_plugin_that_skips_is_passed_over(logged: list[Any]) -> None:
    after = Tag("-after")
    hooks = run(enabled(Behaving("fail"), "breaks", on_error="skip"), enabled(after, "after"))
    changed = result(defer.Deferred.fromCoroutine(hooks.request(body("hi"))))
    assert changed["messages"][-1]["content"] == "hi-after"
    assert "seen" not in changed
    assert len(failures(logged)) == 1
    answer = {"id": "x"}
    assert result(defer.Deferred.fromCoroutine(hooks.response(answer))) is answer
    given = [chunk("a"), chunk("b")]
    out = result(defer.Deferred.fromCoroutine(collect(hooks.stream(source(*given)))))
    assert out == given


def test_a_hook_that_returns_something_else_is_failing(logged: list[Any]) -> None:
    hooks = run(enabled(Behaving("wrong"), on_error="reject"))
    with pytest.raises(PluginFailed):
        result(defer.Deferred.fromCoroutine(hooks.request(body())))
    assert "not a JSON object" in str(failures(logged)[0]["log_failure"].value)


@pytest.mark.parametrize(("on_error", "refused"), [("reject", True), ("skip", False)])
def test_a_hook_that_takes_too_long_times_out(
    on_error: str, refused: bool, logged: list[Any]
) -> None:
    clock = task.Clock()
    metrics = Metrics(CollectorRegistry())
    plugin = Behaving("hang")
    hooks = run(
        enabled(plugin, "slow", on_error=on_error, timeout=0.5), clock=clock, metrics=metrics
    )
    running = defer.Deferred.fromCoroutine(hooks.request(body()))
    clock.advance(0.4)
    assert not running.called
    clock.advance(0.1)
    if refused:
        with pytest.raises(PluginFailed) as raised:
            result(running)
        assert raised.value.code == "plugin_timeout"
        assert "did not answer in time" in raised.value.message
    else:
        assert "seen" not in result(running)
    # The plugin's own Deferred was cancelled, so nothing it does later counts.
    assert plugin.hanging[0].called
    assert metrics.plugin_failures.labels("slow", "on_request", "timeout")._value.get() == 1
    [event] = failures(logged)
    assert event["what"] == "timed out after 0.5s"


def test_a_refusal_is_the_plugins_answer_whatever_on_error_says(logged: list[Any]) -> None:
    hooks = run(enabled(Behaving("refuse"), on_error="skip"))
    with pytest.raises(InvalidRequest) as raised:
        result(defer.Deferred.fromCoroutine(hooks.request(body())))
    assert raised.value.code == "refused_by_plugin"
    assert not failures(logged)


def test_a_client_that_leaves_cancels_a_waiting_hook_without_blaming_the_plugin(
    logged: list[Any],
) -> None:
    metrics = Metrics(CollectorRegistry())
    plugin = Behaving("hang")
    hooks = run(enabled(plugin, on_error="reject"), metrics=metrics)
    running = defer.Deferred.fromCoroutine(hooks.request(body()))
    running.cancel()
    with pytest.raises(defer.CancelledError):
        result(running)
    assert plugin.hanging[0].called
    assert not failures(logged)
    assert metrics.plugin_failures.labels("p", "on_request", "error")._value.get() == 0


# -- chunks -----------------------------------------------------------------------------


@implementer(IChunkHook)
class Chunky:
    """Drops chunks saying "drop", doubles "twice", ends the stream at "stop", adds a tail."""

    def __init__(self, tail: str | None = None) -> None:
        self.tail = tail
        self.ended = 0

    def on_chunk(self, exchange: Exchange, chunk: JSON | None) -> Any:
        if chunk is None:
            self.ended += 1
            return [globals()["chunk"](self.tail)] if self.tail else None
        text = chunk["choices"][0]["delta"]["content"]
        if text == "drop":
            return []
        if text == "twice":
            return [chunk, globals()["chunk"]("again")]
        if text == "stop":
            raise InvalidRequest("that is enough", code="stream_stopped")
        chunk["choices"][0]["delta"]["content"] = text.upper()
        return None


@implementer(IChunkHook)
class Recorder:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def on_chunk(self, exchange: Exchange, chunk: JSON | None) -> None:
        self.seen.append(None if chunk is None else texts([chunk])[0])


def test_chunks_are_changed_dropped_and_multiplied_in_order() -> None:
    plugin, after = Chunky(tail="tail"), Recorder()
    hooks = started(enabled(plugin, "one"), enabled(after, "two"))
    streamed = hooks.stream(source(chunk("a"), chunk("drop"), chunk("twice"), chunk("b")))
    out = result(defer.Deferred.fromCoroutine(collect(streamed)))
    assert texts(out) == ["A", "twice", "again", "B", "tail"]
    # The plugin after it sees what it made, the tail it added at the end
    # included, then the end of the stream.
    assert after.seen == ["A", "twice", "again", "B", "tail", None]
    assert plugin.ended == 1
    assert hooks.streamed


def test_a_chunk_hook_ends_the_stream_with_its_error() -> None:
    source_closed = []

    async def upstream() -> AsyncGenerator[JSON, None]:
        try:
            for text in ("a", "stop", "never"):
                yield chunk(text)
        finally:
            source_closed.append(True)

    hooks = started(enabled(Chunky()))
    streamed = hooks.stream(upstream())
    first = result(defer.Deferred.fromCoroutine(anext(streamed)))  # type: ignore[arg-type]
    assert texts([first]) == ["A"]
    with pytest.raises(OProxyError) as raised:
        result(defer.Deferred.fromCoroutine(anext(streamed)))  # type: ignore[arg-type]
    assert raised.value.code == "stream_stopped"
    assert source_closed == [True]


def test_without_chunk_hooks_the_stream_is_not_wrapped() -> None:
    hooks = run(enabled(Tag("!")))
    result(defer.Deferred.fromCoroutine(hooks.request(body())))
    given = source(chunk("a"))
    assert hooks.stream(given) is given
    assert hooks.streamed


def test_plugins_get_copies_of_chunks_that_are_being_stored() -> None:
    kept = [chunk("a"), chunk("b")]
    hooks = started(enabled(Chunky()))
    out = result(defer.Deferred.fromCoroutine(collect(hooks.stream(source(*kept), copy=True))))
    assert texts(out) == ["A", "B"]
    assert texts(kept) == ["a", "b"]
    in_place = [chunk("a")]
    result(defer.Deferred.fromCoroutine(collect(hooks.stream(source(*in_place)))))
    assert texts(in_place) == ["A"]


# -- completion ----------------------------------------------------------------------


def test_completion_hooks_are_not_waited_for_but_bounded_and_tracked(logged: list[Any]) -> None:
    clock = task.Clock()
    pending = Pending()
    slow, broken = Behaving("hang", only="complete"), Behaving("fail", only="complete")
    hooks = run(
        enabled(slow, "slow", pending=pending, timeout=1.0),
        enabled(broken, "broken", pending=pending),
        clock=clock,
    )
    result(defer.Deferred.fromCoroutine(hooks.request(body())))
    assert len(hooks.active) == 2
    outcome = Outcome(status=200, seconds=0.25, prompt_tokens=3, completion_tokens=5)
    hooks.complete(outcome)  # returns at once: the slow one runs on its own
    assert slow.completed == broken.completed == [outcome]
    assert len(pending) == 1
    settled = defer.Deferred.fromCoroutine(pending.settled())
    assert not settled.called
    clock.advance(1.0)
    assert settled.called and len(pending) == 0
    # A failing completion hook, or a slow one, is only logged: the answer is gone.
    assert {e["plugin"] for e in failures(logged)} == {"slow", "broken"}
    assert all(e["log_level"] == LogLevel.critical for e in failures(logged))
