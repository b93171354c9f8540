"""
From a public model name to an ordered list of routes to try.

The order is the whole decision: the API layer tries the first route and
moves on to the next only while nothing has reached the client (see
:mod:`oproxy.api.dispatch`).  Candidates are the backends allowed by the
model's rule that serve its target model and whose circuits (the
backend's own, and the model's on that backend) let requests through,
ordered by the strategy; the routes of the fallback models follow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from oproxy.backends.base import (
    IBackend,
    IBusyness,
    IImplicitLatest,
    IModelSuffixes,
    IRuntimeOptions,
    ISamplingFields,
    Load,
)
from oproxy.config import ModelRule, RoutingConfig
from oproxy.errors import BackendsDown, ModelNotFound
from oproxy.health import PROBE_TIMEOUT, BackendHealth
from oproxy.metrics import Metrics
from oproxy.routing.breaker import ANSWERED, GO, Breaker, Outcome, Permit
from oproxy.routing.catalog import Catalog
from oproxy.state.base import IStateStore
from oproxy.upstream import within

#: A model list older than this is refreshed before a name is declared unknown.
STALE_SECONDS = 5.0

#: A load a backend reported longer ago than this is not believed any more.
LOAD_STALE_SECONDS = 30.0

#: Top-level OpenAI fields a model's ``options`` may default; the rest are
#: Ollama runtime options (``num_ctx``, ``top_k``...), sent to Ollama only.
OPENAI_FIELDS = frozenset(
    (
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "reasoning_effort",
        "keep_alive",
    )
)


@dataclass(frozen=True)
class Route:
    """
    One way to answer: a backend, the model name it knows, and the defaults
    to merge under the client's request.

    :ivar client_model: the name the answer carries: what the client asked
        for, or the fallback model that answered instead.
    """

    backend: IBackend
    upstream_model: str
    client_model: str = ""
    options: tuple[tuple[str, Any], ...] = ()

    def body(self, sent: Mapping[str, Any]) -> Mapping[str, Any]:
        """The client's body with the model's defaults underneath."""
        if not self.options:
            return sent
        merged = dict(sent)
        native = dict(sent.get("options") or {}) if isinstance(sent.get("options"), dict) else {}
        for name, value in self.options:
            if name in OPENAI_FIELDS or (
                ISamplingFields.providedBy(self.backend)
                and name in ISamplingFields(self.backend).sampling_fields
            ):
                merged.setdefault(name, value)
            elif IRuntimeOptions.providedBy(self.backend):
                native.setdefault(name, value)
        if native:
            merged["options"] = native
        return merged


@dataclass(frozen=True)
class ReportedLoad:
    """
    What a backend last said of its load, and how many of those requests
    were this process's own then: the rest came from other clients.
    """

    requests: int
    ours: int
    at: float

    @property
    def others(self) -> int:
        return max(0, self.requests - self.ours)


@dataclass
class RoutingState:
    """
    What routing learns as it runs; kept across reloads, so a reload does
    not forget which backends are down or busy.

    :ivar busy: requests this process has in flight, per backend.
    :ivar reported: the load backends that tell it (:class:`IBusyness`)
        last reported.
    """

    breaker: Breaker
    catalog: Catalog
    busy: Counter[str] = field(default_factory=Counter)
    reported: dict[str, ReportedLoad] = field(default_factory=dict)
    turns: Counter[str] = field(default_factory=Counter)
    #: Smooth weighted round robin's running credit, per model and backend.
    credit: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        clock: IReactorTime,
        config: RoutingConfig,
        *,
        store: IStateStore | None = None,
        metrics: Metrics | None = None,
    ) -> RoutingState:
        """
        :param store: where circuits are shared with the other processes
            (``None``: each process keeps its own).
        """
        catalog = Catalog(clock)
        breaker = Breaker(
            clock,
            config.breaker_failures,
            config.breaker_cooldown,
            store=store,
            metrics=metrics,
            listed=lambda backend, model: catalog.serves(backend, model) is True,
        )
        return cls(breaker, catalog)


class Router:
    """Map public model names to the routes to try, in order."""

    def __init__(
        self,
        backends: Sequence[IBackend],
        config: RoutingConfig,
        state: RoutingState,
    ) -> None:
        if not backends:
            raise ValueError("a router needs at least one backend")
        self.backends = tuple(backends)
        self.config = config
        self.state = state
        self.state.breaker.configure(config.breaker_failures, config.breaker_cooldown)

    # -- the decision -----------------------------------------------------------

    async def routes(self, model: str) -> list[Route]:
        """
        Every route to try for ``model``, best first, fallbacks after.

        :raises ModelNotFound: no backend serves it (after a fresh look).
        :raises BackendsDown: backends serve it, but every one is out.
        """
        found: list[Route] = []
        down: list[tuple[str, float]] = []
        await self._collect(model, found, down, seen=set())
        if found:
            return found
        if down:
            raise BackendsDown(model, [name for name, _ in down], min(w for _, w in down))
        raise ModelNotFound(model)

    async def _collect(
        self, model: str, found: list[Route], down: list[tuple[str, float]], seen: set[str]
    ) -> None:
        if model in seen:
            return
        seen.add(model)
        rule = self.config.rule_for(model)
        target = (rule.target if rule and rule.target else None) or model
        allowed = [b for b in self.backends if _allowed(rule, b.name)]
        serving = await self._serving(allowed, target, explicit=bool(rule and rule.backends))
        breaker = self.state.breaker
        healthy = []
        for backend in serving:
            circuit = circuit_model(backend, target)
            if breaker.is_open(backend.name, circuit):
                down.append((backend.name, breaker.retry_after(backend.name, circuit)))
            else:
                healthy.append(backend)
        strategy = (rule.strategy if rule else None) or self.config.strategy
        options = rule.options if rule else ()
        for backend in self._order(healthy, target, strategy):
            found.append(Route(backend, target, model, options))
        for fallback in rule.fallbacks if rule else ():
            await self._collect(fallback, found, down, seen)

    async def _serving(
        self, allowed: list[IBackend], target: str, *, explicit: bool
    ) -> list[IBackend]:
        """
        The allowed backends that list ``target``.  Lists older than a few
        seconds are re-read before giving up, so a model pulled a moment
        ago is found.  Backends whose list is unknown (unreachable so far)
        are kept: their own answer will tell.
        """
        catalog = self.state.catalog
        serving = [b for b in allowed if catalog.serves(b.name, _listed(b, target)) is not False]
        if not serving or any(not catalog.known(b.name) for b in allowed):
            stale = [b for b in allowed if catalog.age(b.name) > STALE_SECONDS]
            if stale:
                await catalog.refresh(stale)
                serving = [
                    b for b in allowed if catalog.serves(b.name, _listed(b, target)) is not False
                ]
        if not serving and explicit:
            return allowed  # the config says these serve it: let them answer
        return serving

    def load_of(self, backend: IBackend) -> int:
        """
        How many requests ``backend`` has now, as best known: this
        process's own in flight, plus those of other clients it reported
        at its last reading (when that is recent).
        """
        own = self.state.busy[backend.name]
        reported = self.state.reported.get(backend.name)
        if reported is None:
            return own
        if self.state.catalog.clock.seconds() - reported.at > LOAD_STALE_SECONDS:
            return own
        return own + reported.others

    def _order(self, backends: list[IBackend], model: str, strategy: str) -> list[IBackend]:
        if len(backends) < 2:
            return backends
        busy = {b.name: self.load_of(b) for b in backends} if strategy != "round-robin" else {}
        turn = self.state.turns[model]
        self.state.turns[model] += 1
        rotation = _weighted_rotation(backends, turn, self.state.credit.setdefault(model, {}))
        position = {b.name: i for i, b in enumerate(rotation)}
        if strategy == "round-robin":
            return rotation
        if strategy == "least-busy":
            return sorted(backends, key=lambda b: (busy[b.name] / _weight(b), position[b.name]))
        catalog = self.state.catalog
        return sorted(
            backends,
            key=lambda b: (
                not catalog.loaded(b.name, model),
                busy[b.name] / _weight(b),
                position[b.name],
            ),
        )

    def pool_name(self, model: str) -> str:
        """
        Which backends a model's answers come from, for the response cache:
        the same request answered by any of them is the same answer.
        """
        rule = self.config.rule_for(model)
        target = (rule.target if rule and rule.target else None) or model
        names = sorted(b.name for b in self.backends if _allowed(rule, b.name))
        return f"{target}@{','.join(names)}"

    # -- what probes and discovery report ---------------------------------------------

    def note_probes(self, found: Iterable[BackendHealth]) -> None:
        """
        Active probes feed the circuits and the list of loaded models.  A
        server that answered the probe with an error is up (it may lack the
        probed routes); only one that cannot be reached is taken out.
        """
        for health in found:
            self.state.breaker.probed(health.name, health.reachable or health.answered)
            if health.reachable:
                self.state.catalog.note_loaded(health.name, health.models_loaded)

    def note_load(self, backend: str, load: Load) -> None:
        """What a backend reported of its load, read now."""
        self.state.reported[backend] = ReportedLoad(
            requests=load.requests,
            ours=self.state.busy[backend],
            at=self.state.catalog.clock.seconds(),
        )

    @property
    def reports_load(self) -> bool:
        """Whether any backend says how busy it is (:class:`IBusyness`)."""
        return any(IBusyness.providedBy(b) for b in self.backends)

    async def refresh_loads(self) -> None:
        """
        Read the load of every backend that tells it, concurrently, each
        within the probes' deadline; a backend that does not answer has
        its last report forgotten rather than trusted.
        """
        clock = self.state.catalog.clock

        async def one(backend: IBusyness) -> None:
            try:
                load = await within(
                    defer.Deferred.fromCoroutine(backend.load()), PROBE_TIMEOUT, clock
                )
            except Exception:
                self.state.reported.pop(backend.name, None)
                return
            self.note_load(backend.name, load)

        telling = [IBusyness(b) for b in self.backends if IBusyness.providedBy(b)]
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(b)) for b in telling], consumeErrors=True
        )

    async def refresh_models(self, seconds: float | None = None) -> None:
        """
        Re-read the model lists older than ``discovery_interval``.

        :param seconds: wait this long at most (see :meth:`Catalog.refresh`).
        """
        catalog = self.state.catalog
        stale = [b for b in self.backends if catalog.age(b.name) >= self.config.discovery_interval]
        if stale:
            await catalog.refresh(stale, seconds)

    # -- what the API layer reports back ----------------------------------------------

    def started(self, route: Route) -> None:
        self.state.busy[route.backend.name] += 1

    def finished(self, route: Route) -> None:
        self.state.busy[route.backend.name] -= 1
        if self.state.busy[route.backend.name] <= 0:
            del self.state.busy[route.backend.name]

    def permit(self, route: Route) -> Permit | defer.Deferred[Permit | None] | None:
        """Whether an attempt on ``route`` may go now (see :meth:`Breaker.permit`)."""
        breaker = self.state.breaker
        if breaker.calm:  # the hot path
            return GO
        return breaker.permit(
            route.backend.name, circuit_model(route.backend, route.upstream_model)
        )

    def report(self, route: Route, permit: Permit, outcome: Outcome) -> None:
        """What an attempt on ``route`` taught (see :class:`Outcome`)."""
        breaker, backend = self.state.breaker, route.backend.name
        if outcome is ANSWERED:
            self.state.catalog.mark_loaded(backend, route.upstream_model)
            if breaker.calm and permit is GO:  # the hot path
                return
        breaker.report(backend, circuit_model(route.backend, route.upstream_model), permit, outcome)


def circuit_model(backend: IBackend, model: str) -> str:
    """
    The name a model's circuit on ``backend`` goes by: for Ollama,
    ``llama3.2`` and ``llama3.2:latest`` are one model, and one circuit
    (:class:`IImplicitLatest`).
    """
    if ":" not in model and IImplicitLatest.providedBy(backend):
        return model + ":latest"
    return model


def _listed(backend: IBackend, model: str) -> str:
    """The name ``backend`` lists ``model`` under (``org/m:provider`` is ``org/m``)."""
    return backend.listed_as(model) if IModelSuffixes.providedBy(backend) else model


def _allowed(rule: ModelRule | None, backend: str) -> bool:
    return rule is None or not rule.backends or any(fnmatchcase(backend, p) for p in rule.backends)


def _weight(backend: IBackend) -> int:
    return max(1, getattr(backend, "weight", 1))


def _weighted_rotation(
    backends: list[IBackend], turn: int, credit: dict[str, int]
) -> list[IBackend]:
    """
    The backends in the order of this turn: one step of smooth weighted
    round robin picks the first (over ``sum(weights)`` turns each comes
    first ``weight`` times, interleaved), the rest follow in turn.

    :param credit: the model's running credit per backend, updated here.
    """
    total = sum(_weight(b) for b in backends)
    for b in backends:
        credit[b.name] = credit.get(b.name, 0) + _weight(b)
    first = max(backends, key=lambda b: credit[b.name])
    credit[first.name] -= total
    rest = [b for b in backends if b is not first]
    start = turn % len(rest) if rest else 0
    return [first, *rest[start:], *rest[:start]]
