"""
The command line: the options, the order of one run, and stopping everything
it started whatever happens (an error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from .common import NGINX, SCENARIOS, TARGETS, WRK, BenchError, Settings, log
from .criteria import judge
from .measure import Bench, measure_target
from .memory import measure_memory
from .processes import Processes, cpu_busy_pct
from .report import render
from .results import Results
from .rounds import measure_latency_rounds, measure_scaling
from .upstreams import serve_paced, start_nginx, start_paced


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """
    The options, checked; the defaults that depend on ``--quick`` filled in,
    targets and scenarios as tuples in the table's order (direct always in).
    """
    parser = argparse.ArgumentParser(
        description="Benchmark oproxy against a canned nginx upstream (see bench/README.rst).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s per measurement, 1 s warm-up, 20,000 requests for memory: a smoke run",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=float,
        help="seconds per wrk measurement (default 10; 3 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of wrk warm-up before each measurement (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "-t", "--threads", type=int, default=2, help="wrk threads at high load (default 2)"
    )
    parser.add_argument(
        "-c",
        "--connections",
        type=int,
        default=32,
        help="wrk connections at high load (default 32)",
    )
    parser.add_argument(
        "--low-threads", type=int, default=1, help="wrk threads at moderate load (default 1)"
    )
    parser.add_argument(
        "--low-connections",
        type=int,
        default=4,
        help="wrk connections at moderate load (default 4)",
    )
    parser.add_argument(
        "--moderate-rps",
        type=float,
        default=200.0,
        help="offered load at moderate load, requests/s in total (default 200)",
    )
    parser.add_argument(
        "--ttfb-requests", type=int, help="sequential requests for time to first byte (default 200)"
    )
    parser.add_argument(
        "--stream-lines",
        type=int,
        default=300,
        help="NDJSON lines in the streamed answer (default 300)",
    )
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=5.0,
        help="paced time-to-first-byte test: ms between the first streamed line and the rest "
        "(default 5)",
    )
    parser.add_argument("--paced-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paced-file", help=argparse.SUPPRESS)
    parser.add_argument("--paced-lifetime", type=float, default=6 * 3600, help=argparse.SUPPRESS)
    parser.add_argument(
        "--mem-requests",
        type=int,
        help="requests for the memory run (default 100,000; 20,000 with --quick)",
    )
    parser.add_argument(
        "--mem-checkpoint",
        type=int,
        help="first RSS reading after this many requests (default 10,000; 2,000 with --quick)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin processes to CPUs for the latency measurements (see README)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating runs of the two sides of each target that compares two rows "
        "(1 worker against direct, 2 workers against 1; default 3; 0: use the table's rows)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to SECONDS for other work on the machine "
        "to stop (default 0: do not wait)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory (configs, logs)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.ttfb_requests = args.ttfb_requests if args.ttfb_requests is not None else 200
    args.mem_requests = args.mem_requests or (20000 if quick else 100000)
    args.mem_checkpoint = args.mem_checkpoint or (2000 if quick else 10000)
    for name, value in (
        ("duration", args.duration),
        ("connections", args.connections),
        ("threads", args.threads),
    ):
        if value <= 0:
            parser.error(f"--{name} must be positive")
    if args.moderate_rps <= 0:
        parser.error("--moderate-rps must be positive")
    if args.duration > 600:
        parser.error("--duration is at most 600 seconds")
    if not 0 < args.mem_checkpoint < args.mem_requests <= 10_000_000:
        parser.error("need 0 < --mem-checkpoint < --mem-requests <= 10,000,000")
    args.targets = tuple(t for t in args.targets.split(",") if t)
    args.scenarios = tuple(s for s in args.scenarios.split(",") if s)
    for t in args.targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r}")
    for sc in args.scenarios:
        if sc not in SCENARIOS:
            parser.error(f"unknown scenario {sc!r}")
    if "direct" not in args.targets:
        args.targets = ("direct", *args.targets)  # the baseline everything is compared to
    args.targets = tuple(t for t in TARGETS if t in args.targets)
    args.scenarios = tuple(sc for sc in SCENARIOS if sc in args.scenarios)
    return args


def check_tools() -> None:
    """nginx and wrk are not Python packages: say how to get them."""
    missing = [tool for tool in (NGINX, WRK) if not os.access(tool, os.X_OK)]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: apt-get install -y nginx-light wrk")


def settings_from(args: argparse.Namespace) -> Settings:
    """The checked options, as the settings the measurements read."""
    return Settings(
        duration=args.duration,
        warmup=args.warmup,
        threads=args.threads,
        connections=args.connections,
        low_threads=args.low_threads,
        low_connections=args.low_connections,
        low_rps=args.moderate_rps,
        ttfb_requests=args.ttfb_requests,
        stream_lines=args.stream_lines,
        pace_ms=args.pace_ms,
        mem_checkpoint=args.mem_checkpoint,
        mem_requests=args.mem_requests,
        targets=args.targets,
        scenarios=args.scenarios,
        memory=not args.no_memory,
        nginx_workers=args.nginx_workers,
        wait_quiet=args.wait_quiet,
        pin=not args.no_pin,
        rounds=args.rounds,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """
    Run the benchmark (or, as ``--paced-upstream PORT``, serve the paced
    upstream); the exit status is 0 when every measurement ran, PASS or FAIL
    alike, 1 when one failed, 130 when interrupted.
    """
    args = parse_args(argv)
    if args.paced_upstream:
        serve_paced(args.paced_upstream, Path(args.paced_file), args.pace_ms, args.paced_lifetime)
        return 0
    settings = settings_from(args)
    # Explicitly, since a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="oproxy-bench-"))
    keep = args.keep_tmp
    results = Results(meta={}, settings=asdict(settings))
    status = 0
    try:
        check_tools()
        run(procs, workdir, settings, results)
        print(render(results), flush=True)
        if results.failed():
            status = 1
            keep = True
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        status = 130
    except BenchError as e:
        log(f"error: {e}")
        status = 1
        keep = True
    finally:
        procs.stop_all()
        if args.json and results.meta:
            Path(args.json).write_text(json.dumps(results.to_json(), indent=2) + "\n")
            log(f"results written to {args.json}")
        if keep:
            log(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def run(procs: Processes, workdir: Path, settings: Settings, results: Results) -> None:
    """
    One run, in order: the upstreams, the table (every target), the
    alternating rounds, memory, and the verdicts, all into ``results``.
    A failed measurement is recorded and the run goes on.
    """
    started = time.monotonic()
    results.meta = environment_facts()
    busy = cpu_busy_pct()
    results.meta["cpu_busy_pct_before"] = round(busy, 1)
    if busy > 15:
        log(
            f"warning: the CPUs are already {busy:.0f}% busy before the run; "
            "other work on this machine will lower the numbers"
        )
    log(f"working directory {workdir}")
    upstream = start_nginx(procs, workdir, settings.stream_lines, settings.nginx_workers)
    log(f"nginx: non-streamed answers on :{upstream.plain_port}, stream on :{upstream.stream_port}")
    if "stream" in settings.scenarios and settings.ttfb_requests > 0:
        upstream.paced_port, _ = start_paced(procs, workdir, settings.pace_ms, 6 * 3600)
        log(f"paced stream upstream on :{upstream.paced_port}")
    bench = Bench(procs, workdir, settings, upstream)
    for target in settings.targets:
        measure_target(bench, results, target)
    if (
        settings.rounds > 0
        and {"w1", "w2"} <= set(settings.targets)
        and "chat" in settings.scenarios
    ):
        results.scaling = _or_error(" (scaling)", measure_scaling, bench)
    if settings.rounds > 0 and "w1" in settings.targets:
        results.latency = _or_error(" (latency rounds)", measure_latency_rounds, bench)
    if settings.memory:
        results.memory = _or_error("", measure_memory, bench)
    judge(results)
    results.meta["elapsed_s"] = round(time.monotonic() - started, 1)
    results.meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]


def _or_error(
    what: str, measure: Callable[[Bench], dict[str, Any]], bench: Bench
) -> dict[str, Any]:
    """What ``measure`` found, or ``{"error": ...}`` when it failed (logged)."""
    try:
        return measure(bench)
    except BenchError as e:
        log(f"error{what}: {e}")
        return {"error": str(e)}


def environment_facts() -> dict[str, Any]:
    """The machine and the versions, for the JSON."""

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version as pkg_version

        oproxy_version = pkg_version("oproxy")
        twisted_version = pkg_version("twisted")
    except Exception:
        oproxy_version = twisted_version = "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "oproxy": oproxy_version,
        "twisted": twisted_version,
        "nginx": version([NGINX, "-v"]),
        "wrk": version([WRK, "-v"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }
