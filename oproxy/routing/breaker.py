"""
Passive health: a backend that is down, or one model on it that keeps
failing, is left alone for a while.

Two kinds of circuit, with the arithmetic of :mod:`oproxy.routing.circuits`:

* a backend's own circuit, fed by evidence that the server is down: a
  connection refused or reset, a connect timeout, a failed health probe.
  Open, nothing goes to the backend.
* a circuit per (backend, model), fed by evidence that the server is up
  but the model is not: an HTTP error answer (Ollama's 500 "llama runner
  process has terminated").  Open, that model goes elsewhere (or gets a
  503), and the backend's other models are served as before.

What is not a failure of anything: the client's own mistakes (400, 404
model not found), a client that left, a model slower than its first-byte
timeout, and busy answers (429, 503): those say the server is up and
loaded, not broken.  Busy and any other answer from the server close the
backend's own circuit; only a real answer from the model closes its circuit.

Sharing.  With a state store every process writes each event that changes
a circuit (failures, openings, closings, trials) into it, atomically, and
reads every circuit back every :data:`SYNC_SECONDS`.  Requests read only
the local copy: a successful request on a healthy backend costs two
dictionary look-ups, and no store round trip.  A trial is claimed in the
store, so after a cooldown one request in the whole fleet goes, not one per
process.  A store that does not answer leaves each process with its own
copy, which keeps working as a breaker of one process.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oproxy.metrics import Metrics
from oproxy.routing.circuits import (
    Circuit,
    Policy,
    circuit_key,
    circuit_name,
    decode,
    encode,
    failed,
    trial_ended,
    trial_taken,
    tripped,
)
from oproxy.state.base import CircuitRecord, IStateStore, StateUnavailable

log = Logger()

#: Seconds between reads of the shared circuits: how late another process
#: may learn that a circuit opened or closed.
SYNC_SECONDS = 1.0

#: Local circuits beyond which expired ones are swept at the next change.
SWEEP_ABOVE = 256

#: A circuit's key: the backend's name and the model (``""``: the backend itself).
Key = tuple[str, str]
Step = Callable[[Circuit | None], Circuit | None]


class Outcome(enum.Enum):
    """What one attempt taught about its backend and its model."""

    #: The model answered: the backend and the model are fine.
    ANSWERED = "answered"
    #: The backend answered with an error of its own (HTTP 5xx): the model is failing.
    MODEL_FAILED = "model failed"
    #: The backend could not be reached (refused, reset, connect timeout).
    BACKEND_DOWN = "backend down"
    #: The backend answered, but nothing about the model (busy: 429, 503).
    BACKEND_UP = "backend up"
    #: Nothing learnt (a bad request, a client that left, a slow model).
    UNKNOWN = "unknown"


#: The outcomes as plain names, for the per-request code: looking a member
#: up on an Enum class costs more than everything else a healthy request
#: asks of the breaker.
ANSWERED, MODEL_FAILED, BACKEND_DOWN, BACKEND_UP, UNKNOWN = Outcome


@dataclass(frozen=True)
class Permit:
    """
    Leave for one attempt to go, and the circuits whose trial it carries:
    its outcome, whatever it is, must be reported so a trial is never lost.
    """

    trials: tuple[Key, ...] = ()


#: The permit of every request while no circuit is in the way.
GO = Permit()

#: Outcomes that can only close circuits or hand back trials.
_NOTHING_TO_OPEN = frozenset((ANSWERED, BACKEND_UP, UNKNOWN))


class Breaker:
    """
    Circuit breakers for every backend and every (backend, model), by name.

    :param store: where circuits are shared with other processes (``None``:
        this process only).
    :param metrics: where open circuits are shown.
    :param listed: whether a backend lists a model; a model's circuit is
        shown in metrics only then, so clients cannot add label values.
    """

    def __init__(
        self,
        clock: IReactorTime,
        failures: int = 3,
        cooldown: float = 30.0,
        *,
        store: IStateStore | None = None,
        metrics: Metrics | None = None,
        listed: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.clock = clock
        self.policy = Policy(failures, cooldown)
        self.store = store
        self._metrics = metrics
        self._listed = listed or (lambda backend, model: False)
        self._circuits: dict[Key, Circuit] = {}
        #: No circuit is remembered: every request may go, and an answer
        #: changes nothing (a plain attribute: it is read twice per request).
        self.calm = True
        #: Local events so far; the latest one per circuit; store writes in flight.
        self._events = 0
        self._latest: dict[Key, int] = {}
        self._writing: Counter[Key] = Counter()
        self._in_flight: set[defer.Deferred[Any]] = set()
        self._shown: dict[Key, bool] = {}
        self._store_up = True

    def configure(self, failures: int, cooldown: float) -> None:
        """Take new thresholds from a reloaded config; circuit states carry over."""
        self.policy = Policy(failures, cooldown)

    # -- what routing asks, per request (the local copy only) -----------------------

    def is_open(self, backend: str, model: str = "") -> bool:
        """
        Whether no request for ``model`` may go to ``backend`` now (the
        backend's circuit or the model's holds it back).  Without a model,
        the backend's own circuit only.
        """
        circuits = self._circuits
        if not circuits:
            return False
        now = self.clock.seconds()
        circuit = circuits.get((backend, ""))
        if circuit is not None and circuit.holds_back(now, self.policy):
            return True
        if not model:
            return False
        circuit = circuits.get((backend, model))
        return circuit is not None and circuit.holds_back(now, self.policy)

    def retry_after(self, backend: str, model: str = "") -> float:
        """Seconds until a request for ``model`` could go to ``backend``."""
        now = self.clock.seconds()
        waits = [
            circuit.retry_after(now, self.policy)
            for key in _keys(backend, model)
            if (circuit := self._circuits.get(key)) is not None
        ]
        return max(waits, default=0.0)

    def permit(
        self, backend: str, model: str = ""
    ) -> Permit | defer.Deferred[Permit | None] | None:
        """
        Whether an attempt may go now (``None``: no).  After a cooldown the
        first caller gets the trial and the others wait for its outcome;
        with a store, the trial is claimed there (hence the Deferred), so
        one process gets it.
        """
        if self.calm:
            return GO
        now = self.clock.seconds()
        due: list[Key] = []
        for key in _keys(backend, model):
            circuit = self._circuits.get(key)
            if circuit is None:
                continue
            if circuit.holds_back(now, self.policy):
                return None
            if circuit.trial_due(now, self.policy):
                due.append(key)
        if not due:
            return GO
        if self.store is None:
            for key in due:
                self._apply(key, self._claim_step(now, []))
            return Permit(tuple(due))
        return defer.Deferred.fromCoroutine(self._claim(due, now))

    async def _claim(self, due: list[Key], now: float) -> Permit | None:
        held: list[Key] = []
        for key in due:
            granted: list[bool] = []
            # A store that does not answer leaves this process's own claim standing.
            await self._apply(key, self._claim_step(now, granted))
            if granted == [False] and key in self._circuits:
                for other in held:  # another process has this trial: give ours back
                    self._apply(other, trial_ended)
                return None
            if granted != [False]:
                held.append(key)
            # granted False and no circuit any more: it closed, nothing to hold.
        return Permit(tuple(held))

    def _claim_step(self, now: float, granted: list[bool]) -> Step:
        policy = self.policy

        def claim(circuit: Circuit | None) -> Circuit | None:
            granted[:] = [circuit is not None and circuit.trial_due(now, policy)]
            return trial_taken(circuit, now, policy)

        return claim

    # -- what dispatch and probes report -----------------------------------------------

    def report(self, backend: str, model: str, permit: Permit, outcome: Outcome) -> None:
        """What an attempt that had ``permit`` taught; see :class:`Outcome`."""
        if self.calm and not permit.trials and outcome in _NOTHING_TO_OPEN:
            return  # the hot path: all is well
        now = self.clock.seconds()
        itself, its_model = (backend, ""), (backend, model)
        settled: tuple[Key, ...] = ()
        if outcome is ANSWERED:
            self._close(itself)
            self._close(its_model)
            settled = (itself, its_model)
        elif outcome is MODEL_FAILED:
            self._close(itself)
            self._apply(its_model, lambda c: failed(c, now, self.policy))
            settled = (itself, its_model)
        elif outcome is BACKEND_DOWN:
            self._apply(itself, lambda c: failed(c, now, self.policy))
            settled = (itself,)
        elif outcome is BACKEND_UP:
            self._close(itself)
            settled = (itself,)
        for key in permit.trials:
            if key not in settled:
                self._apply(key, trial_ended)

    def probed(self, backend: str, reachable: bool) -> None:
        """An active probe's verdict: a dead backend opens at once, a live one closes."""
        if reachable:
            self._close((backend, ""))
        else:
            now = self.clock.seconds()
            self._apply((backend, ""), lambda c: tripped(c, now, self.policy))

    def _close(self, key: Key) -> None:
        if key in self._circuits:
            self._apply(key, _closed)

    # -- the local copy and the store -----------------------------------------------

    def _apply(self, key: Key, step: Step) -> defer.Deferred[None]:
        """
        Change a circuit here at once, then in the store; the store's
        answer (what every process agreed on) replaces the local guess.
        """
        now = self.clock.seconds()
        current = self._circuits.get(key)
        self._set(key, step(current.live(now, self.policy) if current else None), shared=False)
        if self.store is None:
            return defer.succeed(None)
        self._events += 1
        event = self._events
        self._latest[key] = event
        self._writing[key] += 1
        policy = self.policy

        def change(value: str | None) -> CircuitRecord | None:
            after = step(decode(value) if value is not None else None)
            return None if after is None else CircuitRecord(encode(after), after.expires(policy))

        writing = self.store.update_circuit(circuit_name(*key), change, now)

        def stored(value: str | None) -> None:
            self._store_answered()
            if self._latest.get(key) == event:
                self._set(key, decode(value) if value is not None else None, shared=True)

        def done(result: Any) -> Any:
            self._writing[key] -= 1
            if self._writing[key] <= 0:
                del self._writing[key]
            return result

        shared = writing.addCallback(stored)
        shared.addBoth(done)
        shared.addErrback(self._store_failed, "update_circuit")
        shared.addErrback(lambda failure: log.failure("Could not share a circuit", failure))
        self._in_flight.add(shared)
        shared.addBoth(self._landed, shared)
        return shared

    def _landed(self, result: Any, writing: defer.Deferred[Any]) -> Any:
        self._in_flight.discard(writing)
        return result

    def sync(self) -> defer.Deferred[None]:
        """
        Read every shared circuit into the local copy; circuits this
        process changed while the read was under way keep their local state.
        """
        if self.store is None:
            return defer.succeed(None)
        mark = self._events
        writing = set(self._writing)
        now = self.clock.seconds()

        async def read() -> None:
            assert self.store is not None
            try:
                records = await self.store.circuits(now)
            except StateUnavailable as e:
                self._store_failed_now(e, "circuits")
                return
            self._store_answered()
            shared: dict[Key, Circuit] = {}
            for name, value in records.items():
                key, circuit = circuit_key(name), decode(value)
                if key is not None and circuit is not None:
                    shared[key] = circuit
            busy = writing | {key for key, event in self._latest.items() if event > mark}
            for key in set(self._circuits) | set(shared):
                if key not in busy:
                    self._set(key, shared.get(key), shared=True)
            self._latest = {
                key: event
                for key, event in self._latest.items()
                if event > mark or key in self._writing
            }

        return defer.Deferred.fromCoroutine(read())

    def flushed(self) -> defer.Deferred[None]:
        """Fires once the store writes under way have landed (for tests and shutdown)."""
        pending = list(self._in_flight)
        if not pending:
            return defer.succeed(None)
        waiting = defer.DeferredList(pending, consumeErrors=True)
        return waiting.addCallback(lambda _: None)

    def _store_answered(self) -> None:
        if not self._store_up:
            self._store_up = True
            log.info("The state store answers again: circuits are shared again")

    def _store_failed(self, failure: Any, operation: str) -> None:
        failure.trap(StateUnavailable)
        self._store_failed_now(failure.value, operation)

    def _store_failed_now(self, error: Exception, operation: str) -> None:
        if self._metrics is not None:
            self._metrics.state_errors.labels(operation).inc()
        if self._store_up:
            self._store_up = False
            log.warn(
                "The state store is unavailable; each process keeps its own circuits "
                "until it answers: {reason}",
                reason=str(error),
            )

    def _set(self, key: Key, circuit: Circuit | None, *, shared: bool) -> None:
        before = self._circuits.get(key)
        if circuit is None:
            self._circuits.pop(key, None)
        else:
            self._circuits[key] = circuit
            if len(self._circuits) > SWEEP_ABOVE:
                self._sweep()
        self.calm = not self._circuits
        was_open = before is not None and before.opened
        is_open = circuit is not None and circuit.opened
        if was_open != is_open:
            self._tell(key, circuit if is_open else None, shared)
            self._show(key, is_open)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for key, circuit in list(self._circuits.items()):
            if circuit.live(now, self.policy) is None:
                self._set(key, None, shared=False)

    def _tell(self, key: Key, opened: Circuit | None, shared: bool) -> None:
        backend, model = key
        source = "the shared state" if shared else "this process"
        if opened is None:
            if model:
                log.info(
                    "Circuit closed: model {model} on backend {backend} is served again"
                    " (seen by {source})",
                    backend=backend,
                    model=model,
                    source=source,
                )
            else:
                log.info(
                    "Circuit closed: backend {backend} is served again (seen by {source})",
                    backend=backend,
                    source=source,
                )
            return
        if model:
            log.warn(
                "Circuit open: model {model} on backend {backend} failed {failures} time(s);"
                " it gets nothing for {cooldown:g}s, the backend's other models are still"
                " served (seen by {source})",
                backend=backend,
                model=model,
                failures=opened.failures,
                cooldown=self.policy.cooldown,
                source=source,
            )
        else:
            log.warn(
                "Circuit open: backend {backend} is down ({failures} failure(s));"
                " it gets nothing for {cooldown:g}s (seen by {source})",
                backend=backend,
                failures=opened.failures,
                cooldown=self.policy.cooldown,
                source=source,
            )

    def _show(self, key: Key, is_open: bool) -> None:
        if self._metrics is None or self._shown.get(key) == is_open:
            return
        backend, model = key
        if not model:
            self._metrics.backend_circuit_open.labels(backend).set(1 if is_open else 0)
        elif key in self._shown or self._listed(backend, model):
            self._metrics.model_circuit_open.labels(backend, model).set(1 if is_open else 0)
        else:
            return
        self._shown[key] = is_open


def _keys(backend: str, model: str) -> tuple[Key, ...]:
    return ((backend, ""), (backend, model)) if model else ((backend, ""),)


def _closed(circuit: Circuit | None) -> None:
    return None


class CircuitSync(service.Service):
    """Read the shared circuits into a breaker every :data:`SYNC_SECONDS`."""

    def __init__(
        self, breaker: Breaker, clock: IReactorTime, interval: float = SYNC_SECONDS
    ) -> None:
        self._breaker = breaker
        self._clock = clock
        self._interval = interval
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._breaker.store is None:
            return
        self._loop = task.LoopingCall(self._breaker.sync)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda failure: log.failure("Reading the shared circuits stopped", failure)
        )

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
