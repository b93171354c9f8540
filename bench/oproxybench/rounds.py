"""
The targets that compare two rows, measured again in alternation: one worker
against the direct baseline (added latency), two workers against one
(scaling).

The rows of the table are measured minutes apart, and the load of a shared
host drifts in minutes: a difference or a ratio between them moves from one
run to the next.  Alternating puts both sides under the same drift; the
targets compare medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .common import SCENARIO_TITLES, TARGET_TITLES, log
from .daemon import Proxy, start_proxy
from .load import run_wrk
from .measure import Bench, measured_run, warm_up
from .probes import request_for, wait_until_serving
from .processes import wait_for_quiet
from .ttfb import measure_ttfb

T = TypeVar("T")


def alternate(rounds: int, sides: dict[str, Callable[[], T]]) -> dict[str, list[T]]:
    """Measure every side once per round, in turn, ``rounds`` times."""
    values: dict[str, list[T]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            values[name].append(measure())
    return values


def measure_latency_rounds(bench: Bench) -> dict[str, Any]:
    """
    Added latency of one worker, from alternating runs against the direct
    baseline: at moderate load (chat, embeddings) and, behind the paced
    upstream, time to first byte.
    """
    settings = bench.settings
    found: dict[str, Any] = {"rounds": settings.rounds}
    for scenario in ("chat", "embed", "stream"):
        paced = scenario == "stream"
        if scenario not in settings.scenarios or (
            paced and (not bench.upstream.paced_port or settings.ttfb_requests <= 0)
        ):
            continue
        values = _latency_rounds(bench, scenario)
        found["ttfb_paced" if paced else scenario] = {
            measure: {
                "direct": [v[measure] for v in values["direct"]],
                "w1": [v[measure] for v in values["w1"]],
                "added_ms": statistics.median(v[measure] for v in values["w1"])
                - statistics.median(v[measure] for v in values["direct"]),
            }
            for measure in values["w1"][0]
        }
    return found


def _latency_rounds(bench: Bench, scenario: str) -> dict[str, list[dict[str, float]]]:
    """One scenario's alternating rounds: moderate-load p50/p99, or paced TTFB."""
    settings = bench.settings
    paced = scenario == "stream"
    upstream_port = bench.upstream.paced_port if paced else bench.upstream.plain_port
    assert upstream_port is not None
    proxy = start_proxy(
        bench.procs, bench.workdir, f"w1-{scenario}-rounds", upstream_port, workers=1, cache=False
    )
    ports = {"direct": upstream_port, "w1": proxy.port}
    pids = {"direct": None, "w1": proxy.process.pid}

    def side(target: str) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            wait_for_quiet(settings.wait_quiet)
            request = request_for(scenario, target)
            label = f"{SCENARIO_TITLES[scenario]} / {TARGET_TITLES[target]}, round"
            if paced:
                ttfb = measure_ttfb(ports[target], request, settings.ttfb_requests, warmup=20)
                log(f"{label}: TTFB median {ttfb['ttfb_median_ms']:.3f} ms")
                return {"ttfb": float(ttfb["ttfb_median_ms"])}
            result = measured_run(
                bench,
                ports[target],
                request,
                settings.moderate_load,
                server_pid=pids[target],
                pin=settings.pin,
                label=label,
            )
            return {"p50": float(result["p50_ms"]), "p99": float(result["p99_ms"])}

        return measure

    try:
        wait_until_serving(proxy.port, scenario, "w1")
        warm_up(bench, proxy.port, request_for(scenario, "w1"), f"warm-up, {scenario} rounds")
        return alternate(settings.rounds, {t: side(t) for t in ("direct", "w1")})
    finally:
        bench.procs.stop(proxy.process)


def measure_scaling(bench: Bench) -> dict[str, Any]:
    """
    Requests/s of one worker and of two, measured in alternation.

    Both daemons run side by side (the one not under load is idle) and wrk
    alternates between them, ``rounds`` times each (:func:`alternate`); the
    ratio is taken between the medians.
    """
    settings = bench.settings
    request = request_for("chat", "w1")
    proxies: dict[str, Proxy] = {}
    try:
        for target, workers in (("w1", 1), ("w2", 2)):
            proxies[target] = start_proxy(
                bench.procs,
                bench.workdir,
                f"{target}-scaling",
                bench.upstream.plain_port,
                workers=workers,
                cache=False,
            )
            wait_until_serving(proxies[target].port, "chat", target)
        time.sleep(1.0)  # worker processes appear

        for target, proxy in proxies.items():
            warm_up(bench, proxy.port, request, f"scaling warm-up ({target})")

        def side(target: str) -> Callable[[], float]:
            def measure() -> float:
                wait_for_quiet(settings.wait_quiet)
                result = run_wrk(
                    bench.procs,
                    bench.workdir,
                    proxies[target].port,
                    request,
                    settings.high_load,
                    settings.duration,
                    label=f"scaling ({target})",
                )
                found = float(result["rps"])
                log(f"scaling: {TARGET_TITLES[target]} {found:,.0f} req/s")
                return found

            return measure

        rps = alternate(settings.rounds, {t: side(t) for t in proxies})
    finally:
        for proxy in proxies.values():
            bench.procs.stop(proxy.process)
    w1, w2 = statistics.median(rps["w1"]), statistics.median(rps["w2"])
    return {
        "rounds": settings.rounds,
        "w1_rps": rps["w1"],
        "w2_rps": rps["w2"],
        "w1_median": w1,
        "w2_median": w2,
        "ratio": w2 / w1 if w1 else None,
    }
