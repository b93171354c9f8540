"""
What each backend serves and has loaded, refreshed in the background.

Model lists come from each backend's own listing (Ollama's ``/api/tags``,
``/v1/models`` elsewhere); loaded models come from the backends that say
what they have loaded (:class:`ILoadedModels`: Ollama's ``/api/ps``, LM
Studio's model states), read with each listing and by health probes, and
from the requests that just went there, since a backend that answered for
a model has it loaded.

One reading of a backend's list is under way at a time: whoever asks
while it runs (a request for an unknown model, ``/v1/models``, the
background probe) waits for that one, and it is cancelled only when all
of them have given up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oproxy.backends.base import IBackend, ILoadedModels
from oproxy.upstream import DeadlineExceeded, within

log = Logger()


class _Shared:
    """
    One reading of a backend's models, awaited by everyone who asks while
    it runs; cancelled when the last of them stops waiting.
    """

    def __init__(self, running: defer.Deferred[None]) -> None:
        self.running = running
        self.waiters = 0

    def wait(self) -> defer.Deferred[None]:
        """A Deferred that fires when the reading is over, and may be cancelled alone."""
        self.waiters += 1

        def given_up(waiter: defer.Deferred[None]) -> None:
            self.waiters -= 1
            if self.waiters == 0 and not self.running.called:
                self.running.cancel()

        waiter: defer.Deferred[None] = defer.Deferred(given_up)

        def over(result: object) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        self.running.addBoth(over)
        return waiter


def name_forms(model: str) -> tuple[str, ...]:
    """``llama3.2`` and ``llama3.2:latest`` are the same Ollama model."""
    if model.endswith(":latest"):
        return (model, model.removesuffix(":latest"))
    if ":" not in model:
        return (model, model + ":latest")
    return (model,)


class Catalog:
    """Models per backend name; ``None`` while a backend's list is unknown."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._served: dict[str, dict[str, dict[str, Any]]] = {}
        self._loaded: dict[str, set[str]] = {}
        self._refreshed: dict[str, float] = {}
        self._reading: dict[str, _Shared] = {}

    def serves(self, backend: str, model: str) -> bool | None:
        served = self._served.get(backend)
        if served is None:
            return None
        return any(form in served for form in name_forms(model))

    def loaded(self, backend: str, model: str) -> bool:
        loaded = self._loaded.get(backend, set())
        return any(form in loaded for form in name_forms(model))

    def loaded_models(self, backend: str) -> list[str]:
        """The models the backend has loaded, as last seen (``/api/ps``, answers)."""
        return sorted(self._loaded.get(backend, set()))

    def models(self, backend: str) -> list[dict[str, Any]]:
        return list(self._served.get(backend, {}).values())

    def known(self, backend: str) -> bool:
        return backend in self._served

    def age(self, backend: str) -> float:
        """Seconds since the backend's list was last asked for (answered or not)."""
        refreshed = self._refreshed.get(backend)
        return float("inf") if refreshed is None else self.clock.seconds() - refreshed

    def note_loaded(self, backend: str, models: Iterable[str]) -> None:
        self._loaded[backend] = set(models)

    def mark_loaded(self, backend: str, model: str) -> None:
        self._loaded.setdefault(backend, set()).add(model)

    def mark_unloaded(self, backend: str, model: str) -> None:
        self._loaded.get(backend, set()).difference_update(name_forms(model))

    def forget(self, keep: Iterable[str]) -> None:
        """Drop backends that a reload removed."""
        kept = set(keep)
        for table in (self._served, self._loaded, self._refreshed):
            for name in list(table):
                if name not in kept:
                    del table[name]

    async def refresh(self, backends: Sequence[IBackend], seconds: float | None = None) -> None:
        """
        Re-read every backend's model list (and, where it says, what it has
        loaded); a backend that fails keeps its last list.  A backend whose
        list is being read already is not asked twice: this waits for that
        reading.

        :param seconds: wait this long at most (``None``: as long as the
            backends' own timeouts allow); a reading nobody else waits for
            is then given up.
        """
        reading = defer.gatherResults([self._read(b) for b in backends], consumeErrors=True)
        if seconds is None:
            await reading
            return
        with contextlib.suppress(DeadlineExceeded):
            await within(reading, seconds, self.clock)

    async def first_listings(self, backends: Sequence[IBackend], seconds: float) -> None:
        """
        Wait, for ``seconds`` at most, until every backend whose models are
        not known yet has answered its first listing: the one under way
        (the probe's, right after start), or one started now for a backend
        never asked.  A backend that was asked and could not answer is not
        waited for again; it is known again once a later reading succeeds.
        """
        waiting = [
            self._read(b)
            for b in backends
            if b.name not in self._served
            and (b.name in self._reading or b.name not in self._refreshed)
        ]
        if not waiting:
            return
        with contextlib.suppress(DeadlineExceeded):
            await within(defer.gatherResults(waiting, consumeErrors=True), seconds, self.clock)

    def _read(self, backend: IBackend) -> defer.Deferred[None]:
        """Wait for the reading of ``backend``'s models under way, starting one if none is."""
        shared = self._reading.get(backend.name)
        if shared is None:
            # Noted before asking, so a backend that cannot list its models
            # is asked again only after a while, not by every request.
            self._refreshed[backend.name] = self.clock.seconds()
            running = defer.Deferred.fromCoroutine(self._list(backend))
            shared = self._reading[backend.name] = _Shared(running)

            def over(result: object) -> None:
                if self._reading.get(backend.name) is shared:
                    del self._reading[backend.name]

            running.addBoth(over)
        return shared.wait()

    async def _list(self, backend: IBackend) -> None:
        listing = defer.Deferred.fromCoroutine(backend.list_models())
        loading = (
            defer.Deferred.fromCoroutine(backend.loaded_models())
            if ILoadedModels.providedBy(backend)
            else None
        )
        try:
            models = await listing
        except Exception as e:
            if loading is not None:
                loading.cancel()
                loading.addErrback(lambda _: None)
            log.info(
                "Could not list the models of backend {backend}: {reason}",
                backend=backend.name,
                reason=str(e),
            )
            return
        self._served[backend.name] = {m["id"]: m for m in models if "id" in m}
        if loading is not None:
            try:
                self.note_loaded(backend.name, await loading)
            except Exception as e:
                log.info(
                    "Could not learn which models backend {backend} has loaded: {reason}",
                    backend=backend.name,
                    reason=str(e),
                )
