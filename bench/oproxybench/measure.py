"""
The table: every scenario on every target, each checked by hand, warmed up,
then measured at high load, at moderate load and for time to first byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import SCENARIO_TITLES, TARGET_TITLES, BenchError, Load, Request, Settings, log
from .daemon import Proxy, start_proxy
from .load import run_wrk
from .probes import check_answer, probe, request_for, wait_until_serving
from .processes import CpuMeter, Processes, pinned, tail, wait_for_quiet
from .results import Cell, Results
from .ttfb import measure_ttfb
from .upstreams import Upstream


@dataclass
class Bench:
    """What every measurement needs: its processes, directory, settings and upstream."""

    procs: Processes
    workdir: Path
    settings: Settings
    upstream: Upstream


def warm_up(bench: Bench, port: int, request: Request, label: str) -> None:
    """wrk at high load for the warm-up time, its numbers thrown away."""
    settings = bench.settings
    run_wrk(
        bench.procs, bench.workdir, port, request, settings.high_load, settings.warmup, label=label
    )


def measured_run(
    bench: Bench,
    port: int,
    request: Request,
    load: Load,
    *,
    server_pid: int | None,
    pin: bool,
    label: str,
) -> dict[str, Any]:
    """
    One wrk run at ``load``: its summary, and where the CPU went (``cpu``).

    The server under test is ``server_pid`` and its children, or the
    upstream itself when it is None (the direct baseline).  With ``pin``,
    the server and the load run on separate cores (:func:`.pinned`): latency
    at moderate load is measured so, but not for two workers, which need
    both cores.
    """
    upstream_pid = bench.upstream.process.pid
    with (
        pinned(server_pid, [upstream_pid], pin) as cpus,
        CpuMeter([server_pid or upstream_pid], [upstream_pid]) as meter,
    ):
        result = run_wrk(
            bench.procs,
            bench.workdir,
            port,
            request,
            load,
            bench.settings.duration,
            label=label,
            cpus=cpus,
        )
    result["cpu"] = meter.result
    log(
        f"  {result['rps']:.0f} req/s, p50 {result['p50_ms']:.3f} ms, "
        f"p99 {result['p99_ms']:.3f} ms, errors {result['errors']}; "
        f"server {meter.result['server_cores']:.2f} cores, "
        f"other work {meter.result['foreign_cores']:.2f} cores"
    )
    return result


def measure_target(bench: Bench, results: Results, target: str) -> None:
    """Every scenario on one target; a failure is recorded in its cells."""
    settings, upstream = bench.settings, bench.upstream
    workers = 2 if target == "w2" else 1
    cache = {"direct": None, "w1": False, "w2": False, "cache": True}[target]
    for kind in ("plain", "stream"):
        scenarios = [s for s in settings.scenarios if (s == "stream") == (kind == "stream")]
        if not scenarios:
            continue
        upstream_port = upstream.stream_port if kind == "stream" else upstream.plain_port
        proxy: Proxy | None = None
        cells = [Cell(s, target) for s in scenarios]
        results.cells.extend(cells)
        try:
            if target == "direct":
                port = upstream_port
                processes = 1
            else:
                log(f"starting oproxy ({TARGET_TITLES[target]}, {kind} upstream)")
                proxy = start_proxy(
                    bench.procs,
                    bench.workdir,
                    f"{target}-{kind}",
                    upstream_port,
                    workers=workers,
                    cache=cache,
                )
                port = proxy.port
                wait_until_serving(port, scenarios[0], target)
                # Give worker processes time to appear before counting them.
                time.sleep(1.0 if workers > 1 else 0.2)
                processes = len(proxy.serving_pids())
        except BenchError as e:
            for cell in cells:
                cell.error = str(e)
            log(f"error: {e}")
            if proxy is not None:
                bench.procs.stop(proxy.process)
            continue
        try:
            for cell in cells:
                try:
                    measure_cell(
                        bench,
                        cell,
                        port,
                        processes,
                        proxy.process.pid if proxy is not None else None,
                    )
                except BenchError as e:
                    cell.error = str(e)
                    log(f"error: {e}")
                    if proxy is not None:
                        log("  daemon log:\n" + tail(proxy.log_path, 10))
        finally:
            if proxy is not None:
                bench.procs.stop(proxy.process)
    stream_cell = results.cell("stream", target)
    if (
        upstream.paced_port
        and target != "cache"
        and stream_cell is not None
        and not stream_cell.error
    ):
        measure_paced_ttfb(bench, stream_cell)


def measure_cell(
    bench: Bench, cell: Cell, port: int, processes: int, server_pid: int | None
) -> None:
    """
    One row of the table, on a server already serving at ``port``
    (``server_pid`` None: the upstream itself, the direct baseline).
    """
    settings = bench.settings
    scenario, target = cell.scenario, cell.target
    title = f"{SCENARIO_TITLES[scenario]} / {TARGET_TITLES[target]}"
    request = request_for(scenario, target)
    cell.processes = processes
    first = probe(port, request)
    cell.chunks_per_answer = check_answer(scenario, target, first)
    # The cache is on by default and shows itself only in X-Cache: keep what
    # three more identical requests got (BYPASS where it is turned off).
    cell.x_cache = [first.headers.get("x-cache", "")]
    for _ in range(3 if target != "direct" else 0):
        again = probe(port, request)
        check_answer(scenario, target, again)
        cell.x_cache.append(again.headers.get("x-cache", ""))
    hits = any(v.upper().startswith("HIT") for v in cell.x_cache)
    if target == "cache":
        cell.cache_hit = hits
        if not hits:
            cell.note = "cache: n/a"
            log(f"{title}: no X-Cache: HIT seen ({cell.x_cache!r}); cache: n/a")
            return
    elif hits:
        cell.note = "cache hits!"
        log(f"warning: {title} was answered from the cache ({cell.x_cache!r})")
    wait_for_quiet(settings.wait_quiet)
    log(f"{title}: warm-up {settings.warmup:.0f}s")
    warm_up(bench, port, request, f"warm-up {title}")
    log(f"{title}: wrk -t{settings.threads} -c{settings.connections} -d{settings.duration:.0f}s")
    cell.high = measured_run(
        bench, port, request, settings.high_load, server_pid=server_pid, pin=False, label=title
    )
    moderate = settings.moderate_load
    log(
        f"{title}: moderate load wrk -t{moderate.threads} "
        f"-c{moderate.connections} -d{settings.duration:.0f}s, "
        f"{moderate.delay_ms:.1f} ms pause per connection"
    )
    cell.low = measured_run(
        bench,
        port,
        request,
        moderate,
        server_pid=server_pid,
        pin=settings.pin and target != "w2",
        label=f"moderate {title}",
    )
    if scenario in ("chat", "stream") and settings.ttfb_requests > 0:
        cell.ttfb = measure_ttfb(
            port, request, settings.ttfb_requests, warmup=min(20, settings.ttfb_requests)
        )
        log(
            f"  TTFB median {cell.ttfb['ttfb_median_ms']:.3f} ms over "
            f"{settings.ttfb_requests} sequential requests"
        )


def measure_paced_ttfb(bench: Bench, cell: Cell) -> None:
    """Time to first byte behind the paced upstream (the first line comes alone)."""
    settings, upstream = bench.settings, bench.upstream
    target = cell.target
    assert upstream.paced_port is not None
    request = request_for("stream", target)
    proxy: Proxy | None = None
    try:
        if target == "direct":
            port = upstream.paced_port
        else:
            proxy = start_proxy(
                bench.procs,
                bench.workdir,
                f"{target}-paced",
                upstream.paced_port,
                workers=2 if target == "w2" else 1,
                cache=False,
            )
            port = proxy.port
            wait_until_serving(port, "stream", target)
        check_answer("stream", target, probe(port, request))
        cell.ttfb_paced = measure_ttfb(
            port, request, settings.ttfb_requests, warmup=min(20, settings.ttfb_requests)
        )
        cell.ttfb_paced["pace_ms"] = settings.pace_ms
        log(
            f"{SCENARIO_TITLES['stream']} / {TARGET_TITLES[target]}: TTFB median behind the paced "
            f"upstream {cell.ttfb_paced['ttfb_median_ms']:.3f} ms"
        )
    except BenchError as e:
        log(f"error (paced TTFB, {TARGET_TITLES[target]}): {e}")
        cell.note = "paced TTFB failed"
    finally:
        if proxy is not None:
            bench.procs.stop(proxy.process)
