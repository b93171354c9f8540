"""
Health: is the process up, can it serve, and how is each backend doing.

Probes are cheap reads (Ollama's ``/api/version``, ``/api/tags`` and
``/api/ps``) with a short deadline, run concurrently; they never run a
completion, so a health check can never load a model or cost GPU time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from oproxy import __version__
from oproxy.backends.base import IBackend
from oproxy.errors import OProxyError, UpstreamTimeout, UpstreamUnavailable
from oproxy.metrics import Metrics
from oproxy.upstream import DeadlineExceeded, within

log = Logger()

#: How long one backend probe may take before it counts as unreachable.
PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class BackendHealth:
    """What one probe of one backend found."""

    name: str
    reachable: bool
    latency_seconds: float
    version: str | None = None
    models_available: int | None = None
    models_loaded: tuple[str, ...] = ()
    error: str | None = None
    #: The server answered HTTP, even if not as a probe wants (an older
    #: server, or one in front of it, without the probed routes): it is up.
    answered: bool = False
    #: The backend's ``type``, for people reading ``/v1/health``.
    kind: str | None = None
    #: What else the server's own health routes said (slots, queue, context).
    details: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "name": self.name,
            "type": self.kind,
            "reachable": self.reachable,
            "probe_latency_seconds": round(self.latency_seconds, 6),
            "version": self.version,
            "models_available": self.models_available,
            "models_loaded": list(self.models_loaded),
            "error": self.error,
        }
        if self.details:
            shown["details"] = dict(self.details)
        return shown


async def probe(backend: IBackend, clock: IReactorTime, deadline: float) -> BackendHealth:
    """Probe one backend; any failure is reported, never raised."""
    started = clock.seconds()
    answered = False
    try:
        found = await within(defer.Deferred.fromCoroutine(backend.probe()), deadline, clock)
    except DeadlineExceeded:
        error = f"no answer within {deadline:g} seconds"
    except (UpstreamUnavailable, UpstreamTimeout) as e:
        error = e.message
    except OProxyError as e:
        error, answered = e.message, True
    except Exception as e:
        error = str(e) or type(e).__name__
    else:
        details = found.get("details")
        return BackendHealth(
            name=backend.name,
            reachable=True,
            latency_seconds=clock.seconds() - started,
            version=found.get("version"),
            models_available=found.get("models_available"),
            models_loaded=tuple(found.get("models_loaded", ())),
            answered=True,
            kind=getattr(backend, "kind", None),
            details=details if isinstance(details, Mapping) else None,
        )
    return BackendHealth(
        name=backend.name,
        reachable=False,
        latency_seconds=clock.seconds() - started,
        error=error,
        answered=answered,
        kind=getattr(backend, "kind", None),
    )


async def probe_all(
    backends: Sequence[IBackend],
    clock: IReactorTime,
    metrics: Metrics | None = None,
    deadline: float = PROBE_TIMEOUT,
) -> list[BackendHealth]:
    """Probe every backend concurrently; record what was found in ``metrics``."""
    probes = [defer.Deferred.fromCoroutine(probe(b, clock, deadline)) for b in backends]
    results: list[BackendHealth] = await defer.gatherResults(probes)
    if metrics is not None:
        for found in results:
            metrics.backend_up.labels(found.name).set(1 if found.reachable else 0)
            metrics.probe_latency.labels(found.name).set(found.latency_seconds)
    return results


def report(
    backends: Sequence[BackendHealth],
    *,
    uptime_seconds: float,
    workers: int,
    state_store: Mapping[str, Any],
    shows_model: Callable[[str], bool],
) -> dict[str, Any]:
    """
    The ``/v1/health`` document: ``ok`` when every backend and the state
    store answer, ``degraded`` when some backend does not or the store is
    down but the proxy fails open, ``unavailable`` when no backend answers
    or the store is down and the proxy fails closed.

    :param shows_model: whether the caller may see a model's name; the
        names of loaded models are filtered by it, as ``/api/ps`` and
        ``/v1/models`` filter theirs, so a key limited to some models does
        not learn the others.
    """
    reachable = sum(1 for b in backends if b.reachable)
    status = "ok" if reachable == len(backends) else "degraded" if reachable else "unavailable"
    if not state_store["reachable"] and status != "unavailable":
        status = "degraded" if state_store["on_unavailable"] == "open" else "unavailable"
    return {
        "status": status,
        "version": __version__,
        "uptime_seconds": round(uptime_seconds, 3),
        "workers": workers,
        "backends": [_shown(b.to_json(), shows_model) for b in backends],
        "state_store": dict(state_store),
    }


def _shown(backend: dict[str, Any], shows_model: Callable[[str], bool]) -> dict[str, Any]:
    """A backend's entry with only the loaded models the caller may see."""
    backend["models_loaded"] = [m for m in backend["models_loaded"] if shows_model(m)]
    return backend


#: Seconds between background probes, which keep the backend gauges current
#: for Prometheus even when nobody asks for ``/readyz``.
PROBE_INTERVAL = 15.0

#: Seconds between readings of the backends that say how busy they are
#: (vLLM's queue, llama.cpp's slots): often enough for ``least-busy`` to
#: follow a burst, rarely enough to cost the servers nothing.
LOAD_INTERVAL = 2.0


class ProbeService(service.Service):
    """
    Probe every backend in the background and record what was found: in
    metrics, in the circuit breakers (a dead backend is skipped before a
    request fails on it) and in routing's view of loaded models; refresh
    model lists that have grown old.

    :param first_round: called once, with what the first probe found, when
        the model lists it started are known too (to say at start-up what
        each backend is doing).
    """

    def __init__(
        self,
        app: Any,
        clock: IReactorTime,
        interval: float = PROBE_INTERVAL,
        *,
        first_round: Callable[[list[BackendHealth]], object] | None = None,
        load_interval: float = LOAD_INTERVAL,
    ) -> None:
        self._app = app
        self._clock = clock
        self._interval = interval
        self._loop: task.LoopingCall | None = None
        #: Fires when the loop has stopped, after the probe under way, if any.
        self._looping: defer.Deferred[Any] | None = None
        #: The probe under way, cancelled by a stop.
        self._probing: defer.Deferred[None] | None = None
        self._first_round = first_round
        self._load_interval = load_interval
        self._load_loop: task.LoopingCall | None = None
        #: The reading of loads under way, cancelled by a stop.
        self._reading: defer.Deferred[None] | None = None

    def _read_loads(self) -> defer.Deferred[None] | None:
        """
        Read how busy the backends that say it are, unless a reading is
        still under way or none says it (the loop keeps running, as a
        reload may add one).
        """
        router = self._app.router
        if self._reading is not None or not router.reports_load:
            return None

        def ended(result: object) -> None:
            self._reading = None
            if isinstance(result, Failure) and self.running:
                log.failure("Reading the backends' load failed", result)

        reading = defer.Deferred.fromCoroutine(router.refresh_loads())
        reading.addBoth(ended)
        if not reading.called:
            self._reading = reading
        return None

    def _probe(self) -> defer.Deferred[Any]:
        async def probe_and_learn() -> None:
            router = self._app.router
            found = await probe_all(router.backends, self._clock, self._app.metrics)
            if not self.running:
                return  # stopped meanwhile: nothing more to learn
            router.note_probes(found)
            await router.refresh_models()
            first_round, self._first_round = self._first_round, None
            if first_round is not None:
                first_round(found)

        def failed(failure: Failure) -> None:
            if self.running:  # else cancelled by the stop: not news
                log.failure("Probe failed", failure)

        def ended(result: object) -> object:
            self._probing = None
            return result

        probing = defer.Deferred.fromCoroutine(probe_and_learn())
        probing.addErrback(failed).addBoth(ended)
        if not probing.called:
            self._probing = probing
        return probing

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = task.LoopingCall(self._probe)
        self._loop.clock = self._clock
        self._looping = self._loop.start(self._interval, now=True)
        self._load_loop = task.LoopingCall(self._read_loads)
        self._load_loop.clock = self._clock
        self._load_loop.start(self._load_interval, now=True)

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop probing.  A probe under way is cancelled (a stopping process
        has no use for what it would find, and a backend that does not
        answer would hold the stop for as long as its timeouts); the
        Deferred fires once it has let go of its connections, so that the
        pool it uses is not closed under it, or after :data:`PROBE_TIMEOUT`
        at most.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._load_loop is not None and self._load_loop.running:
            self._load_loop.stop()
        if self._reading is not None:
            self._reading.cancel()
        if self._probing is not None:
            self._probing.cancel()
        looping, self._looping = self._looping, None
        if looping is None:
            return defer.succeed(None)

        async def stopped() -> None:
            with contextlib.suppress(DeadlineExceeded):
                await within(looping, PROBE_TIMEOUT, self._clock)

        return defer.Deferred.fromCoroutine(stopped())
