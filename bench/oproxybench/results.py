"""
What a run found: one :class:`Cell` per scenario and target, the alternating
rounds, the memory run and the verdicts; and its JSON form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Cell:
    """One scenario on one target: a row of the table (high, low: wrk's summaries)."""

    scenario: str
    target: str
    processes: int | None = None
    high: dict[str, Any] | None = None
    low: dict[str, Any] | None = None
    chunks_per_answer: int | None = None
    ttfb: dict[str, Any] | None = None
    ttfb_paced: dict[str, Any] | None = None
    x_cache: list[str] = field(default_factory=list)
    cache_hit: bool | None = None
    note: str = ""
    error: str = ""


@dataclass
class Results:
    meta: dict[str, Any]
    settings: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    scaling: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    criteria: list[dict[str, Any]] = field(default_factory=list)

    def cell(self, scenario: str, target: str) -> Cell | None:
        for c in self.cells:
            if c.scenario == scenario and c.target == target:
                return c
        return None

    def failed(self) -> bool:
        """A measurement failed (as opposed to missing its target)."""
        return any(c.error for c in self.cells) or bool((self.memory or {}).get("error"))

    def to_json(self) -> dict[str, Any]:
        """Every number, as ``--json`` writes it."""
        return {
            "meta": self.meta,
            "settings": self.settings,
            "cells": [asdict(c) for c in self.cells],
            "memory": self.memory,
            "scaling": self.scaling,
            "latency": self.latency,
            "criteria": self.criteria,
        }


def value_of(cell: Cell | None, part: str, key: str) -> float | None:
    """One number of a cell (``part``: high, low, ttfb, ttfb_paced), None if not measured."""
    if cell is None or cell.error:
        return None
    data = getattr(cell, part)
    if not data:
        return None
    value = data.get(key)
    return float(value) if value is not None else None
