"""
The arithmetic of one circuit: pure functions from a state and an event to the next state.

A circuit is closed (``None``: nothing to remember), counting failures, or
open.  ``failures`` failures in a row open it, each within ``cooldown``
seconds of the one before (failures further apart than that are not a
pattern, and a count that is not kept for ever can be forgotten by the
store).  An open circuit sends nothing for ``cooldown`` seconds; then one
trial request may go, and holds the circuit for at most another
``cooldown`` (a trial whose process died must not hold it for ever).  The
trial's success closes the circuit, its failure opens it again.

Being pure, the same functions decide for the breaker of one process and,
run by the state store inside one atomic step, for every process that
shares it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson

#: Seconds an open circuit is remembered after it could have had its trial,
#: when nobody asks for it: a model nobody uses is not worth a record.
FORGET_OPEN = 600.0


@dataclass(frozen=True)
class Policy:
    """When a circuit opens and for how long."""

    failures: int = 3
    cooldown: float = 30.0


@dataclass(frozen=True)
class Circuit:
    """
    A circuit that is not simply closed.

    :ivar failures: failures in a row.
    :ivar last_failure: when the latest of them came.
    :ivar opened_at: when the circuit opened (``None``: still closed).
    :ivar trial_until: while later than now, a trial request is out and
        nothing else may go.
    """

    failures: int = 0
    last_failure: float = 0.0
    opened_at: float | None = None
    trial_until: float | None = None

    @property
    def opened(self) -> bool:
        return self.opened_at is not None

    def holds_back(self, now: float, policy: Policy) -> bool:
        """Whether no request may go now: cooling down, or its trial is out."""
        if self.opened_at is None:
            return False
        if now - self.opened_at < policy.cooldown:
            return True
        return self.trial_until is not None and self.trial_until > now

    def trial_due(self, now: float, policy: Policy) -> bool:
        """Open, cooled down, and nobody holds the trial."""
        return self.opened_at is not None and not self.holds_back(now, policy)

    def retry_after(self, now: float, policy: Policy) -> float:
        """Seconds until a request could go (0 while only someone's trial holds it)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + policy.cooldown - now)

    def expires(self, policy: Policy) -> float:
        """When the circuit may be forgotten, as if it had closed."""
        if self.opened_at is None:
            return self.last_failure + policy.cooldown
        trial_end = self.trial_until if self.trial_until is not None else 0.0
        return max(self.opened_at + policy.cooldown, trial_end) + FORGET_OPEN

    def live(self, now: float, policy: Policy) -> Circuit | None:
        """The circuit, or ``None`` once it is forgotten."""
        return self if now < self.expires(policy) else None


def failed(circuit: Circuit | None, now: float, policy: Policy) -> Circuit:
    """One more failure: counted, and the circuit opens (again) at the threshold."""
    if circuit is not None and circuit.opened:
        # A failed trial, or a request sent before the circuit opened.
        return Circuit(circuit.failures + 1, now, now, None)
    earlier = circuit.failures if circuit is not None else 0
    if circuit is not None and now - circuit.last_failure > policy.cooldown:
        earlier = 0
    failures = earlier + 1
    return Circuit(failures, now, now if failures >= policy.failures else None, None)


def tripped(circuit: Circuit | None, now: float, policy: Policy) -> Circuit:
    """Evidence enough at once (a dead backend's probe): open now."""
    failures = max(circuit.failures if circuit is not None else 0, policy.failures)
    return Circuit(failures, now, now, None)


def trial_taken(circuit: Circuit | None, now: float, policy: Policy) -> Circuit | None:
    """The circuit once a trial request is out, if one was due; else unchanged."""
    if circuit is None or not circuit.trial_due(now, policy):
        return circuit
    return replace(circuit, trial_until=now + policy.cooldown)


def trial_ended(circuit: Circuit | None) -> Circuit | None:
    """A trial that taught nothing (the client left, the server was busy): another may go."""
    if circuit is None or circuit.trial_until is None:
        return circuit
    return replace(circuit, trial_until=None)


def encode(circuit: Circuit) -> str:
    """The form kept in a state store."""
    fields = [circuit.failures, circuit.last_failure, circuit.opened_at, circuit.trial_until]
    return orjson.dumps(fields).decode()


def decode(value: str) -> Circuit | None:
    """A circuit from :func:`encode`'s form; ``None`` for anything else."""
    try:
        fields = orjson.loads(value)
        if not isinstance(fields, list):
            return None
        failures, last_failure, opened_at, trial_until = fields
        return Circuit(
            int(failures),
            float(last_failure),
            None if opened_at is None else float(opened_at),
            None if trial_until is None else float(trial_until),
        )
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None


def circuit_name(backend: str, model: str) -> str:
    """The name a state store knows a circuit by (``model`` empty: the whole backend)."""
    return orjson.dumps([backend, model]).decode()


def circuit_key(name: str) -> tuple[str, str] | None:
    """``(backend, model)`` from :func:`circuit_name`; ``None`` for a name that is not one."""
    try:
        parts = orjson.loads(name)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parts, list) or len(parts) != 2:
        return None
    backend, model = parts
    if not isinstance(backend, str) or not isinstance(model, str):
        return None
    return backend, model
