"""
Passive health: a backend that keeps failing is left alone for a while.

Closed (normal) → open after ``failures`` consecutive failures → after
``cooldown`` seconds, half-open: one trial request may go; its success
closes the circuit, its failure opens it for another cooldown.  Active
probes feed the same state, so a backend found dead by a probe is skipped
before any request has to fail on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    trial_running: bool = False


class Breaker:
    """Circuit breakers for every backend, by name."""

    def __init__(self, clock: IReactorTime, failures: int = 3, cooldown: float = 30.0) -> None:
        self.clock = clock
        self.failures = failures
        self.cooldown = cooldown
        self._circuits: dict[str, _Circuit] = {}

    def configure(self, failures: int, cooldown: float) -> None:
        """Take new thresholds from a reloaded config; circuit states carry over."""
        self.failures, self.cooldown = failures, cooldown

    def _circuit(self, backend: str) -> _Circuit:
        return self._circuits.setdefault(backend, _Circuit())

    def is_open(self, backend: str) -> bool:
        """Open and still cooling down: no request may go."""
        circuit = self._circuits.get(backend)
        if circuit is None or circuit.opened_at is None:
            return False
        if self.clock.seconds() - circuit.opened_at < self.cooldown:
            return True
        return circuit.trial_running

    def allow(self, backend: str) -> bool:
        """
        Whether a request may go now; after the cooldown, the first caller
        gets the one trial and the others wait for its outcome.
        """
        if self.is_open(backend):
            return False
        circuit = self._circuits.get(backend)
        if circuit is not None and circuit.opened_at is not None:
            circuit.trial_running = True
        return True

    def retry_after(self, backend: str) -> float:
        circuit = self._circuits.get(backend)
        if circuit is None or circuit.opened_at is None:
            return 0.0
        return max(0.0, circuit.opened_at + self.cooldown - self.clock.seconds())

    def succeeded(self, backend: str) -> None:
        self._circuits[backend] = _Circuit()

    def failed(self, backend: str) -> None:
        circuit = self._circuit(backend)
        circuit.failures += 1
        circuit.trial_running = False
        if circuit.opened_at is not None or circuit.failures >= self.failures:
            circuit.opened_at = self.clock.seconds()

    def probed(self, backend: str, reachable: bool) -> None:
        """An active probe's verdict: a dead backend opens at once, a live one closes."""
        if reachable:
            circuit = self._circuits.get(backend)
            if circuit is not None and circuit.opened_at is not None:
                self.succeeded(backend)
        else:
            circuit = self._circuit(backend)
            circuit.failures = max(circuit.failures, self.failures)
            circuit.trial_running = False
            circuit.opened_at = self.clock.seconds()
