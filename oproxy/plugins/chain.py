"""
The plugins in force, and one request's run through them.

A :data:`Chain` is the configuration's ``plugins:`` list, built: a tuple of
:class:`Enabled` plugins, in order, held by the services record a request
starts with (a reload swaps it with the rest, and a request keeps its own).
With no plugin enabled it is the empty tuple, and the request path asks it
nothing else: no object is made, no function called.

:class:`Hooks` is one request's run: the pipeline makes one after the
body is read, runs the request hooks, and keeps it (on the request's
scope) only if some plugin applies, for the answer, the chunks, and the
completion once the answer is sent.  A plugin's failure or timeout is
logged and then refuses the request (``on_error: reject``) or is passed
over (``skip``); either way it stays within this request.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from oproxy.config.plugins import PluginConfig
from oproxy.errors import OProxyError, PluginFailed
from oproxy.metrics import Metrics
from oproxy.plugins.interface import (
    JSON,
    Exchange,
    IChunkHook,
    ICompletionHook,
    IRequestHook,
    IResponseHook,
    Outcome,
)

log = Logger()

Hook = Callable[[Exchange, Any], Any]


class Pending:
    """
    Completion hooks still running, which a stopping process waits for.
    """

    def __init__(self) -> None:
        self._running: set[defer.Deferred[Any]] = set()

    def __len__(self) -> int:
        return len(self._running)

    def add(self, running: defer.Deferred[Any]) -> None:
        if not running.called:
            self._running.add(running)
            running.addBoth(self._done, running)

    def _done(self, result: object, running: defer.Deferred[Any]) -> None:
        self._running.discard(running)

    async def settled(self) -> None:
        while self._running:
            await defer.DeferredList(list(self._running))


@dataclass(frozen=True, eq=False)
class Enabled:
    """
    One plugin of the chain: its entry in the configuration, the plugin
    built from it, and the hooks it provides (``None`` for the others).
    """

    settings: PluginConfig
    plugin: object
    on_request: Hook | None
    on_response: Hook | None
    on_chunk: Hook | None
    on_complete: Hook | None
    pending: Pending
    _routes: dict[str, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, settings: PluginConfig, plugin: object, pending: Pending) -> Enabled:
        """
        :raises TypeError: the plugin provides none of the hook interfaces.
        """

        def hook(name: str, interface: Any) -> Hook | None:
            found: Hook | None = getattr(plugin, name) if interface.providedBy(plugin) else None
            return found

        enabled = cls(
            settings,
            plugin,
            on_request=hook("on_request", IRequestHook),
            on_response=hook("on_response", IResponseHook),
            on_chunk=hook("on_chunk", IChunkHook),
            on_complete=hook("on_complete", ICompletionHook),
            pending=pending,
        )
        if not (
            enabled.on_request or enabled.on_response or enabled.on_chunk or enabled.on_complete
        ):
            raise TypeError(
                "it provides none of IRequestHook, IResponseHook, IChunkHook and ICompletionHook"
            )
        return enabled

    @property
    def name(self) -> str:
        return self.settings.name

    def applies(self, route: str, key: str | None, model: str | None) -> bool:
        """Whether the entry's ``routes``, ``keys`` and ``models`` let it see a request."""
        settings = self.settings
        if settings.routes:
            matched = self._routes.get(route)
            if matched is None:
                # Bounded: the routes are the table's.
                matched = self._routes[route] = _matches(route, settings.routes)
            if not matched:
                return False
        if settings.keys and (key is None or not _matches(key, settings.keys)):
            return False
        return not settings.models or (model is not None and _matches(model, settings.models))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


#: The plugins in force, in order; empty when none is enabled.
Chain = tuple[Enabled, ...]


class _Skipped:
    """A hook that failed, and whose plugin says to go on without it."""


SKIPPED: Any = _Skipped()


def _json_or_none(result: Any) -> Any:
    if result is None or isinstance(result, dict):
        return result
    raise TypeError(f"the hook returned {type(result).__name__}, not a JSON object or None")


def _chunks(result: Any) -> Any:
    if result is None or isinstance(result, dict):
        return result
    if isinstance(result, list) and all(isinstance(each, dict) for each in result):
        return result
    raise TypeError(
        f"the hook returned {type(result).__name__}, not a chunk, a list of chunks or None"
    )


def model_of(body: JSON) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) else None


class Hooks:
    """
    One request's run through the plugins that apply to it.

    :ivar active: each plugin that applies, with its exchange, in order.
    :ivar streamed: whether the answer went through :meth:`stream`.
    """

    def __init__(
        self,
        chain: Chain,
        clock: IReactorTime,
        metrics: Metrics,
        *,
        route: str,
        api: str,
        key: str | None,
        request_id: str,
        started: float,
    ) -> None:
        self._chain = chain
        self._clock = clock
        self._metrics = metrics
        self.route = route
        self.api = api
        self.key = key
        self.request_id = request_id
        self.started = started
        self.active: list[tuple[Enabled, Exchange]] = []
        self.streamed = False

    # -- the phases -----------------------------------------------------------------

    async def request(self, body: JSON) -> JSON:
        """
        Decide which plugins apply, in order, and run their request hooks;
        the body to go on with.  Each plugin's filters see the body as the
        plugins before it left it.
        """
        model = model_of(body)
        for enabled in self._chain:
            if not enabled.applies(self.route, self.key, model):
                continue
            exchange = Exchange(
                self.route, self.api, self.key, model, self.request_id, self.started
            )
            self.active.append((enabled, exchange))
            hook = enabled.on_request
            if hook is None:
                continue
            result = await self._call(enabled, "on_request", hook, exchange, body, _json_or_none)
            if result is not None and result is not SKIPPED:
                body = result
            model = model_of(body)
        for _, exchange in self.active:
            exchange.model = model
        return body

    async def response(self, answer: JSON) -> JSON:
        """The whole answer, through each response hook in turn."""
        for enabled, exchange in self.active:
            hook = enabled.on_response
            if hook is not None:
                result = await self._call(
                    enabled, "on_response", hook, exchange, answer, _json_or_none
                )
                if result is not None and result is not SKIPPED:
                    answer = result
        return answer

    def stream(
        self, chunks: AsyncGenerator[JSON, None], *, copy: bool = False
    ) -> AsyncGenerator[JSON, None]:
        """
        The chunks, through each chunk hook in turn.

        :param copy: give the plugins copies: the chunks are also being
            stored (by the response cache), as the backend sent them.
        """
        self.streamed = True
        hooks = [(e, x) for e, x in self.active if e.on_chunk is not None]
        if not hooks:
            return chunks
        return self._filtered(chunks, hooks, copy)

    def complete(self, outcome: Outcome) -> None:
        """
        Tell the completion hooks how the request ended; what they return
        to wait for runs on its own, bounded by their timeouts.
        """
        for enabled, exchange in self.active:
            hook = enabled.on_complete
            if hook is None:
                continue
            try:
                result = hook(exchange, outcome)
            except Exception:
                self._failed(enabled, "on_complete", Failure())
                continue
            if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
                running = self._bounded(enabled, result)
                running.addErrback(self._completion_failed, enabled)
                enabled.pending.add(running)

    # -- running one hook -------------------------------------------------------------

    async def _call(
        self,
        enabled: Enabled,
        phase: str,
        hook: Hook,
        exchange: Exchange,
        payload: Any,
        check: Callable[[Any], Any],
    ) -> Any:
        """
        The hook's result, awaited within the plugin's timeout; a refusal
        (an :class:`OProxyError`) is raised as it is, a failure is
        :meth:`_failed`.
        """
        try:
            result = hook(exchange, payload)
            if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
                result = await self._bounded(enabled, result)
            return check(result)
        except (OProxyError, defer.CancelledError):
            raise
        except Exception:
            return self._failed(enabled, phase, Failure())

    def _bounded(self, enabled: Enabled, result: Awaitable[Any]) -> defer.Deferred[Any]:
        running: defer.Deferred[Any] = defer.Deferred.fromCoroutine(_awaited(result))
        running.addTimeout(enabled.settings.timeout, self._clock)
        return running

    def _failed(self, enabled: Enabled, phase: str, failure: Failure) -> Any:
        """
        Log a plugin's failure (Sentry gets it with the request's fields),
        count it, then refuse the request or pass over the hook.
        """
        timed_out = failure.check(defer.TimeoutError) is not None
        self._metrics.plugin_failures.labels(
            enabled.name, phase, "timeout" if timed_out else "error"
        ).inc()
        log.failure(
            "Plugin {plugin} {what} in {hook} ({request_id}); {action}",
            failure,
            plugin=enabled.name,
            what=f"timed out after {enabled.settings.timeout:g}s" if timed_out else "failed",
            hook=phase,
            action="refusing the request"
            if enabled.settings.rejects and phase != "on_complete"
            else "going on without it",
            request_id=self.request_id,
            route=self.route,
        )
        if enabled.settings.rejects and phase != "on_complete":
            raise PluginFailed(enabled.name, timed_out=timed_out)
        return SKIPPED

    def _completion_failed(self, failure: Failure, enabled: Enabled) -> None:
        self._failed(enabled, "on_complete", failure)

    # -- streams ------------------------------------------------------------------------

    async def _filtered(
        self,
        chunks: AsyncGenerator[JSON, None],
        hooks: list[tuple[Enabled, Exchange]],
        copy: bool,
    ) -> AsyncGenerator[JSON, None]:
        async with aclosing(chunks):
            async for chunk in chunks:
                given = orjson.loads(orjson.dumps(chunk)) if copy else chunk
                for passed in await self._through(hooks, 0, [given]):
                    yield passed
        # The stream ended normally: each plugin may add what it held back,
        # which the plugins after it see as chunks.
        for index, (enabled, exchange) in enumerate(hooks):
            added = await self._chunk(enabled, exchange, None)
            if added:
                for passed in await self._through(hooks, index + 1, added):
                    yield passed

    async def _through(
        self, hooks: list[tuple[Enabled, Exchange]], start: int, chunks: list[JSON]
    ) -> list[JSON]:
        for index in range(start, len(hooks)):
            enabled, exchange = hooks[index]
            passed: list[JSON] = []
            for chunk in chunks:
                passed.extend(await self._chunk(enabled, exchange, chunk))
            chunks = passed
            if not chunks:
                break
        return chunks

    async def _chunk(self, enabled: Enabled, exchange: Exchange, chunk: JSON | None) -> list[JSON]:
        assert enabled.on_chunk is not None
        result = await self._call(enabled, "on_chunk", enabled.on_chunk, exchange, chunk, _chunks)
        if result is None or result is SKIPPED:
            return [] if chunk is None else [chunk]
        if isinstance(result, dict):
            return [result]
        return list(result)


async def _awaited(result: Awaitable[Any]) -> Any:
    return await result
