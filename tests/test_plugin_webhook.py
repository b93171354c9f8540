"""
``webhook``: against a real HTTP server on loopback that fails, refuses,
goes away and recovers; batches, backoff, the bounded queue, the flush on
stop and its deadline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.logger import capturedLogs
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from oproxy.config.reading import structure
from oproxy.config.values import ConfigError
from oproxy.metrics import Metrics
from oproxy.plugins.interface import Environment, Exchange, Outcome
from oproxy.plugins.webhook import Webhook, WebhookOptions, record, shown
from tests.e2e.conftest import free_port


class Receiver(Resource):
    """
    Takes POSTed batches; answers ``failures`` of them with ``status`` first
    (or holds them unanswered, with ``status`` 0).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[dict[str, Any]]] = []
        self.attempts = 0
        self.failures = 0
        self.status = 503
        self.headers: list[dict[bytes, list[bytes]]] = []

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for batch in self.batches for r in batch]

    def render_POST(self, request: Request) -> Any:
        self.attempts += 1
        self.headers.append(dict(request.requestHeaders.getAllRawHeaders()))
        assert request.content is not None
        batch = json.loads(request.content.read())
        if self.failures:
            self.failures -= 1
            if self.status == 0:
                return NOT_DONE_YET
            request.setResponseCode(self.status)
            return b"not now"
        self.batches.append(batch)
        return b"ok"


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never became true")


class Harness:
    def __init__(self, port: int) -> None:
        self.port = port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.metrics = Metrics(CollectorRegistry())
        self.environment = Environment(
            clock=reactor, http=HTTPClient(Agent(reactor, pool=self.pool)), metrics=self.metrics
        )
        self.receiver = Receiver()
        self.listening: Any = None
        self.hooks: list[Webhook] = []

    def listen(self) -> None:
        self.listening = reactor.listenTCP(self.port, Site(self.receiver), interface="127.0.0.1")

    def webhook(self, **options: Any) -> Webhook:
        given = {"url": f"http://127.0.0.1:{self.port}/hook?token=secret", **options}
        hook = Webhook(structure(given, WebhookOptions), self.environment)
        hook.startService()
        self.hooks.append(hook)
        return hook

    def dropped(self) -> float:
        url = f"http://127.0.0.1:{self.port}/hook"
        value: float = self.metrics.webhook_dropped.labels(url)._value.get()
        return value


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness(free_port())
    made.listen()
    yield made
    for hook in made.hooks:
        if hook.running:
            pytest_twisted.blockon(hook.stopService())
    if made.listening is not None:
        pytest_twisted.blockon(made.listening.stopListening())
    pytest_twisted.blockon(made.pool.closeCachedConnections())


def item(number: int) -> dict[str, Any]:
    return {"n": number}


@pytest_twisted.ensureDeferred
async def test_batches_are_posted_and_retried_until_the_receiver_recovers(
    harness: Harness,
) -> None:
    harness.receiver.failures = 2
    with capturedLogs() as events:
        hook = harness.webhook(
            batch_size=2, flush_interval=0.05, backoff=0.05, headers={"Authorization": "Bearer t"}
        )
        for number in range(5):
            hook.enqueue(item(number))
        await until(lambda: hook.delivered == 5)
    assert harness.receiver.records == [item(n) for n in range(5)]  # in order, once each
    assert all(len(batch) <= 2 for batch in harness.receiver.batches)
    assert harness.receiver.attempts == len(harness.receiver.batches) + 2
    headers = harness.receiver.headers[0]
    assert headers[b"Authorization"] == [b"Bearer t"]
    assert headers[b"Content-Type"] == [b"application/json"]
    assert headers[b"User-Agent"][0].startswith(b"oproxy/")
    said = [e["log_format"] for e in events if e.get("url")]
    assert sum("could not deliver" in s for s in said) == 1
    assert sum("delivering again" in s for s in said) == 1
    # The log names the URL without its query, which may hold a secret.
    assert all("secret" not in str(e.get("url")) for e in events)
    assert hook.dropped == 0


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_is_not_there_yet_gets_the_records_when_it_comes(
    harness: Harness,
) -> None:
    await harness.listening.stopListening()
    harness.listening = None
    hook = harness.webhook(flush_interval=0.02, backoff=0.05, max_backoff=0.1)
    hook.enqueue(item(1))
    await task.deferLater(reactor, 0.2, lambda: None)
    assert hook.delivered == 0
    harness.listen()
    await until(lambda: hook.delivered == 1)
    assert harness.receiver.records == [item(1)]


@pytest_twisted.ensureDeferred
async def test_a_full_queue_drops_the_oldest_counts_them_and_says_so_once(
    harness: Harness,
) -> None:
    harness.receiver.failures = 1
    harness.receiver.status = 0  # the first POST hangs: the queue fills behind it
    with capturedLogs() as events:
        hook = harness.webhook(
            batch_size=1, flush_interval=0.01, max_queue=3, timeout=0.5, backoff=0.05
        )
        hook.enqueue(item(0))
        await until(lambda: harness.receiver.attempts == 1)
        for number in range(1, 11):
            hook.enqueue(item(number))  # never waits
        assert hook.queued == 3
        assert hook.dropped == 7
        assert harness.dropped() == 7
        await until(lambda: hook.delivered == 4)
    # The hung batch was tried again; the newest three came after it.
    assert harness.receiver.records == [item(0), item(8), item(9), item(10)]
    dropping = [e for e in events if "dropping records" in e.get("log_format", "")]
    assert len(dropping) == 1
    assert "queue is full" in dropping[0]["why"]


@pytest_twisted.ensureDeferred
async def test_a_refused_batch_is_dropped_and_the_next_goes(harness: Harness) -> None:
    harness.receiver.failures = 1
    harness.receiver.status = 400
    hook = harness.webhook(batch_size=1, flush_interval=0.01, backoff=0.05)
    hook.enqueue(item(1))
    await until(lambda: hook.dropped == 1)
    hook.enqueue(item(2))
    await until(lambda: hook.delivered == 1)
    assert harness.receiver.records == [item(2)]
    assert harness.receiver.attempts == 2  # the refused batch was not tried again


@pytest_twisted.ensureDeferred
async def test_a_stop_delivers_what_is_queued(harness: Harness) -> None:
    hook = harness.webhook(batch_size=100, flush_interval=60)
    for number in range(3):
        hook.enqueue(item(number))
    await hook.stopService()
    assert harness.receiver.records == [item(0), item(1), item(2)]
    # Stopped, it drops what it is given.
    hook.enqueue(item(4))
    assert hook.dropped == 1


@pytest_twisted.ensureDeferred
async def test_a_stop_gives_up_at_its_deadline(harness: Harness) -> None:
    harness.receiver.failures = 10_000
    hook = harness.webhook(batch_size=2, flush_interval=0.01, backoff=0.05, stop_timeout=0.3)
    for number in range(5):
        hook.enqueue(item(number))
    await until(lambda: harness.receiver.attempts >= 1)
    await hook.stopService()
    assert hook.delivered == 0
    assert hook.dropped == 5 and harness.dropped() == 5
    assert hook.queued == 0


def test_the_record_says_who_what_and_how_it_went_and_nothing_said() -> None:
    exchange = Exchange("/v1/chat/completions", "openai", "alice", "gpt-4o-mini", "req_9", 100.0)
    outcome = Outcome(
        status=200,
        seconds=1.5,
        first_token_seconds=0.2,
        prompt_tokens=10,
        completion_tokens=20,
        model="llama3.2:latest",
        backend="local",
        cache="MISS",
        streamed=True,
    )
    assert record(exchange, outcome) == {
        "request_id": "req_9",
        "started": 100.0,
        "route": "/v1/chat/completions",
        "api": "openai",
        "key": "alice",
        "model": "gpt-4o-mini",
        "upstream_model": "llama3.2:latest",
        "backend": "local",
        "status": 200,
        "error": None,
        "stream": True,
        "cache": "MISS",
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "seconds": 1.5,
        "first_token_seconds": 0.2,
    }


def test_the_hook_only_queues() -> None:
    clock = task.Clock()
    environment = Environment(clock=clock, http=None, metrics=Metrics(CollectorRegistry()))
    hook = Webhook(structure({"url": "https://hooks.example/in"}, WebhookOptions), environment)
    hook.running = True  # as started, but with no sender: nothing may be sent from the hook
    exchange = Exchange("/api/chat", "ollama", None, "m", "req_1", 0.0)
    assert hook.on_complete(exchange, Outcome(status=200)) is None  # type: ignore[func-returns-value]
    assert hook.queued == 1


def test_options() -> None:
    options = structure(
        {"url": "https://user:pw@hooks.example/in?k=v", "headers": {"X-Token": "t"}},
        WebhookOptions,
    )
    assert "X-Token" not in repr(options)
    assert shown(options.url) == "https://hooks.example/in"
    for given, key in [
        ({"url": "ftp://x"}, "url"),
        ({}, "url"),
        ({"url": "http://x", "headers": {"A": 1}}, "headers"),
        ({"url": "http://x", "batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(ConfigError) as raised:
            structure(given, WebhookOptions)
        assert raised.value.key == key


@pytest_twisted.ensureDeferred
async def test_a_stopped_sender_is_not_left_running(harness: Harness) -> None:
    hook = harness.webhook()
    sender = hook._sender
    await hook.stopService()
    assert sender is not None and sender.called
