"""
What each backend serves and has loaded, refreshed in the background.

Model lists come from each backend's own listing (Ollama's ``/api/tags``,
``/v1/models`` elsewhere); loaded models come from health probes (Ollama's
``/api/ps``) and from the requests that just went there, since a backend
that answered for a model has it loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oproxy.backends.base import IBackend

log = Logger()


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

    def forget(self, keep: Iterable[str]) -> None:
        """Drop backends that a reload removed."""
        kept = set(keep)
        for table in (self._served, self._loaded, self._refreshed):
            for name in list(table):
                if name not in kept:
                    del table[name]

    async def refresh(self, backends: Sequence[IBackend]) -> None:
        """Re-read every backend's model list; a backend that fails keeps its last list."""

        async def one(backend: IBackend) -> None:
            # Noted before asking, so a backend that cannot list its models
            # is asked again only after a while, not by every request.
            self._refreshed[backend.name] = self.clock.seconds()
            try:
                models = await backend.list_models()
            except Exception as e:
                log.info(
                    "Could not list the models of backend {backend}: {reason}",
                    backend=backend.name,
                    reason=str(e),
                )
                return
            self._served[backend.name] = {m["id"]: m for m in models if "id" in m}

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(b)) for b in backends], consumeErrors=True
        )
