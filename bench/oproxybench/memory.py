"""
Memory: VmRSS of a fresh 1-worker proxy (the daemon and its children) at
start, after a first budget of requests and after the whole run.
"""

from __future__ import annotations

import time
from typing import Any

from .common import BenchError, log
from .daemon import start_proxy
from .load import run_wrk_budget
from .measure import Bench
from .probes import request_for, wait_until_serving
from .processes import CpuMeter, rss_kib, tail, wait_for_quiet


def measure_memory(bench: Bench) -> dict[str, Any]:
    """
    A fresh 1-worker proxy (the daemon's default cache setting), VmRSS at
    the checkpoint and at the total number of non-streaming chat requests.
    """
    settings, upstream = bench.settings, bench.upstream
    log("memory: starting a fresh oproxy (1 worker)")
    proxy = start_proxy(
        bench.procs, bench.workdir, "memory", upstream.plain_port, workers=1, cache=None
    )
    try:
        wait_until_serving(proxy.port, "chat", "w1")
        request = request_for("chat", "w1")

        def snapshot() -> dict[str, Any]:
            time.sleep(0.5)  # let the last answers be written and freed
            per: dict[int, int] = {}
            for pid in proxy.serving_pids():
                kib = rss_kib(pid)
                if kib is not None:
                    per[pid] = kib
            return {
                "processes": len(per),
                "rss_mib_total": sum(per.values()) / 1024,
                "rss_mib_max_process": max(per.values()) / 1024 if per else 0.0,
                "rss_mib_by_pid": {str(pid): kib / 1024 for pid, kib in per.items()},
            }

        memory: dict[str, Any] = {"start": snapshot()}
        done = 0
        for goal in (settings.mem_checkpoint, settings.mem_requests):
            budget = goal - done
            # At worst 100 req/s, and never more than 30 minutes per leg.
            limit = min(1800.0, 30 + budget / 100)
            wait_for_quiet(settings.wait_quiet)
            log(f"memory: {budget:,} requests (to {goal:,})")
            with CpuMeter([proxy.process.pid], [upstream.process.pid]) as meter:
                run = run_wrk_budget(
                    bench.procs,
                    bench.workdir,
                    proxy.port,
                    request,
                    settings.high_load,
                    total=budget,
                    max_seconds=limit,
                )
            done += run["requests"]
            snap = snapshot()
            snap.update(
                requests_done=done,
                run_rps=run["rps"],
                run_errors=run["errors"],
                budget_reached=run["budget_reached"],
                cpu=meter.result,
            )
            memory[str(goal)] = snap
            log(
                f"  after {done:,} requests: VmRSS {snap['rss_mib_total']:.1f} MiB "
                f"in {snap['processes']} process(es); {run['rps']:.0f} req/s, "
                f"{run['errors']} errors"
            )
            if proxy.process.poll() is not None:
                raise BenchError("the proxy died during the memory run:\n" + tail(proxy.log_path))
        first = memory[str(settings.mem_checkpoint)]["rss_mib_total"]
        last = memory[str(settings.mem_requests)]["rss_mib_total"]
        memory["checkpoint"] = settings.mem_checkpoint
        memory["total"] = settings.mem_requests
        memory["change_pct"] = (last - first) / first * 100 if first else None
        return memory
    finally:
        bench.procs.stop(proxy.process)
