"""
``webhook``: a JSON record of every finished request, POSTed to a URL.

Each request's record (who, which route and model, status, tokens, timing;
never its prompt or answer) is queued by the completion hook, after the
answer has been sent, and the hook returns at once: a slow or broken
receiver never delays an answer.  A sender posts the queue in batches (a
JSON array of records, at most ``batch_size``, at least every
``flush_interval`` seconds) through the process's pooled connections, one
batch at a time, in order.  A batch that fails (no connection, a timeout, a
``5xx``, ``408`` or ``429``) is tried again after a backoff that doubles up
to ``max_backoff``; one the receiver refuses (another ``4xx``) is dropped.

The queue is bounded (``max_queue``): when the receiver has been away long
enough to fill it, the oldest records go first, counted in
``oproxy_webhook_dropped_records`` and said once in the log (again after
the receiver has been reached since).  When the process stops, the sender
delivers what is queued for up to ``stop_timeout`` seconds, then gives up,
counting what it could not deliver.  With worker processes each worker
posts its own records.
"""

from __future__ import annotations

from collections import deque
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import orjson
import treq
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from oproxy import __version__
from oproxy.config.values import Count, Seconds, invalid, mapping, string
from oproxy.plugins.interface import (
    JSON,
    Environment,
    Exchange,
    ICompletionHook,
    Outcome,
    PluginFactory,
)

log = Logger()

#: Statuses after which the same batch may well be taken later.
RETRIED_STATUSES = frozenset((408, 425, 429))


def webhook_url(value: Any) -> str:
    text = string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"must be an http(s) URL, not {text!r}")
    return text


def headers(value: Any) -> tuple[tuple[str, str], ...]:
    """Extra request headers (``Authorization: Bearer ${TOKEN}``), as given."""
    given = mapping(value)
    for name, text in given.items():
        if not isinstance(text, str):
            raise invalid(f"{name}: must be a string")
    return tuple(given.items())


def shown(url: str) -> str:
    """The URL without what may be a secret (credentials, query), for the log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@attrs.frozen
class WebhookOptions:
    """
    :ivar url: where the records go (``http`` or ``https``).
    :ivar headers: sent with every POST (``Authorization``, say).
    :ivar batch_size: the most records one POST carries.
    :ivar flush_interval: the longest a record waits for its batch to fill.
    :ivar max_queue: the most records waiting; beyond, the oldest are dropped.
    :ivar timeout: seconds one POST may take.
    :ivar backoff: seconds before the first retry of a failed batch.
    :ivar max_backoff: the longest wait between retries.
    :ivar stop_timeout: seconds a stopping process gives the queue.
    """

    url: Annotated[str, webhook_url]
    #: Often a secret: kept out of the options' ``repr`` (and so of logs).
    headers: Annotated[tuple[tuple[str, str], ...], headers] = attrs.field(default=(), repr=False)
    batch_size: Count = 100
    flush_interval: Seconds = 1.0
    max_queue: Count = 10_000
    timeout: Seconds = 10.0
    backoff: Seconds = 0.5
    max_backoff: Seconds = 30.0
    stop_timeout: Seconds = 5.0


def record(exchange: Exchange, outcome: Outcome) -> JSON:
    """What the receiver learns about one request."""
    return {
        "request_id": exchange.request_id,
        "started": exchange.started,
        "route": exchange.route,
        "api": exchange.api,
        "key": exchange.key,
        "model": exchange.model,
        "upstream_model": outcome.model,
        "backend": outcome.backend,
        "status": outcome.status,
        "error": outcome.error,
        "stream": outcome.streamed,
        "cache": outcome.cache,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "seconds": outcome.seconds,
        "first_token_seconds": outcome.first_token_seconds,
    }


class _Refused(Exception):
    """The receiver refused a batch for good (a ``4xx`` other than a retried one)."""


@implementer(ICompletionHook)
class Webhook(service.Service):
    """
    The queue and its sender, a service of the process.

    :ivar delivered: records the receiver took.
    :ivar dropped: records dropped (full queue, refused, or a stop).
    """

    def __init__(self, options: WebhookOptions, environment: Environment) -> None:
        self.options = options
        self._http = environment.http
        self._clock = environment.clock
        self._url = options.url.encode("utf-8")
        self._shown = shown(options.url)
        self._headers: dict[str, str] = {
            "Content-Type": "application/json",
            "User-Agent": f"oproxy/{__version__}",
            **dict(options.headers),
        }
        self._dropped = environment.metrics.webhook_dropped.labels(self._shown)
        self._queue: deque[JSON] = deque()
        self.delivered = 0
        self.dropped = 0
        self._said_dropping = False
        self._failing = False
        self._wake: defer.Deferred[None] | None = None
        self._sender: defer.Deferred[None] | None = None
        self._stopping = False

    # -- the hook: never waits ------------------------------------------------------

    def on_complete(self, exchange: Exchange, outcome: Outcome) -> None:
        self.enqueue(record(exchange, outcome))

    def enqueue(self, item: JSON) -> None:
        if not self.running:
            self._drop(1, "the webhook is stopped")
            return
        queue = self._queue
        if len(queue) >= self.options.max_queue:
            queue.popleft()
            self._drop(1, f"its queue is full ({self.options.max_queue} records)")
        queue.append(item)
        if len(queue) == 1 or len(queue) >= self.options.batch_size:
            self._notify()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self._dropped.inc(count)
        if not self._said_dropping:
            self._said_dropping = True
            log.warn(
                "Webhook {url}: dropping records, as {why} "
                "(oproxy_webhook_dropped_records counts them)",
                url=self._shown,
                why=why,
            )

    # -- the sender -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._sender = defer.Deferred.fromCoroutine(self._send())
        self._sender.addErrback(self._sender_failed)

    def _sender_failed(self, failure: Any) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("Webhook {url}: the sender failed", failure, url=self._shown)

    def _notify(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    def _wait(self, seconds: float | None) -> defer.Deferred[None]:
        """Until :meth:`_notify`, or ``seconds`` have passed."""
        wake: defer.Deferred[None] = defer.Deferred()
        self._wake = wake
        if seconds is not None:
            timer: IDelayedCall = self._clock.callLater(seconds, self._notify)

            def stop_timer(result: None) -> None:
                if timer.active():
                    timer.cancel()

            wake.addBoth(stop_timer)
        return wake

    async def _send(self) -> None:
        options = self.options
        queue = self._queue
        while True:
            if not queue:
                if self._stopping:
                    return
                await self._wait(None)
                continue
            if len(queue) < options.batch_size and not self._stopping:
                await self._wait(options.flush_interval)
                if not queue:
                    continue
            batch = [queue.popleft() for _ in range(min(options.batch_size, len(queue)))]
            await self._deliver(batch)

    async def _deliver(self, batch: list[JSON]) -> None:
        """Post ``batch`` until it is taken or refused, backing off in between."""
        delay = self.options.backoff
        try:
            while True:
                try:
                    await self._post(batch)
                except _Refused as refused:
                    self._drop(len(batch), f"the receiver refused them ({refused})")
                    return
                except defer.CancelledError:
                    raise
                except Exception as e:
                    if not self._failing:
                        self._failing = True
                        log.warn(
                            "Webhook {url}: could not deliver {count} records ({error}); "
                            "retrying with backoff",
                            url=self._shown,
                            count=len(batch),
                            error=str(e) or type(e).__name__,
                        )
                    await task.deferLater(self._clock, delay, lambda: None)
                    delay = min(delay * 2, self.options.max_backoff)
                    continue
                self.delivered += len(batch)
                if self._failing:
                    self._failing = False
                    log.info("Webhook {url}: delivering again", url=self._shown)
                self._said_dropping = False
                return
        except defer.CancelledError:
            self._drop(len(batch), "the process stopped before they were delivered")
            raise

    async def _post(self, batch: list[JSON]) -> None:
        posting = self._http.post(self._url, data=orjson.dumps(batch), headers=self._headers)
        posting.addTimeout(self.options.timeout, self._clock)
        response = await posting
        reading = treq.content(response)
        reading.addTimeout(self.options.timeout, self._clock)
        await reading
        status = response.code
        if 200 <= status < 300:
            return
        if status >= 500 or status in RETRIED_STATUSES:
            raise RuntimeError(f"HTTP {status}")
        raise _Refused(f"HTTP {status}")

    def stopService(self) -> defer.Deferred[None]:
        """
        Deliver what is queued within ``stop_timeout`` seconds, then give up
        (what is left is counted as dropped).
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        self._notify()
        sender, self._sender = self._sender, None
        if sender is None:
            return defer.succeed(None)
        deadline = self._clock.callLater(self.options.stop_timeout, sender.cancel)

        def stopped(result: object) -> None:
            if deadline.active():
                deadline.cancel()
            if self._queue:
                self._drop(len(self._queue), "the process stopped before they were delivered")
                self._queue.clear()

        stopping: defer.Deferred[None] = defer.Deferred()
        sender.addBoth(stopped).addBoth(lambda _: stopping.callback(None))
        return stopping


def build(options: WebhookOptions, environment: Environment) -> Webhook:
    return Webhook(options, environment)


factory = PluginFactory(
    "webhook",
    build,
    options=WebhookOptions,
    description="POST a JSON record of every finished request to a URL, in batches.",
)
