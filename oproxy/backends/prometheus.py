"""
Reading a few gauges from a server's Prometheus ``/metrics`` page.

vLLM, TGI and llama.cpp say how busy they are only there.  Their pages
run to hundreds of lines of histograms, and the reactor's thread reads
them every few seconds, so this scans lines for the wanted names rather
than parsing the whole exposition format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from oproxy.backends.base import Load


def gauge_sums(text: bytes, names: Iterable[str]) -> dict[str, float]:
    """
    The sum of each wanted metric's samples over every label set (vLLM
    has one per engine and served model), for the names that appear.

    A sample line is ``name{labels} value [timestamp]``; comments, other
    metrics and values that are not finite numbers are skipped.
    """
    wanted = {name.encode("ascii"): name for name in names}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith(b"#"):
            continue
        brace = line.find(b"{")
        space = line.find(b" ")
        end = brace if 0 <= brace < space or (brace >= 0 and space < 0) else space
        name = wanted.get(line[:end] if end >= 0 else line)
        if name is None:
            continue
        after = line[line.rfind(b"}") + 1 :] if brace >= 0 else line[end:]
        fields = after.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + value
    return sums


def gauge_load(text: bytes, *, running: str, waiting: str) -> Load:
    """How busy a server is, from its gauges of requests running and waiting."""
    sums = gauge_sums(text, (running, waiting))
    return Load(running=int(sums.get(running, 0)), waiting=int(sums.get(waiting, 0)))
