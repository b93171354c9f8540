"""
wrk: its command line (built in one place), a timed run, a run with an exact
budget of requests, and the parsing of what it prints.

Both runs use ``bench/wrk/post.lua`` (``budget.lua`` wraps it), which POSTs
the body written to a file and prints exact percentiles as one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import LOOPBACK, LUA_DIR, WRK, BenchError, Load, Request
from .processes import Processes

_UNITS_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS_TO_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """
    wrk's summary: requests/s, latency percentiles (ms), errors.

    The exact numbers come from the ``BENCH_JSON`` line post.lua prints; the
    ``--latency`` text is parsed too, as the fallback and a cross-check.
    """
    result: dict[str, Any] = {}
    text_pct: dict[str, float] = {}
    for match in re.finditer(r"^\s+(50|75|90|99)(?:\.000)?%\s+(\S+)\s*$", output, re.M):
        text_pct[match.group(1)] = _ms(match.group(2))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(\w+),", output, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockerr = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    exact = re.search(r"^BENCH_JSON (\{.*\})$", output, re.M)
    if exact:
        data = json.loads(exact.group(1))
        lat = data["latency_us"]
        seconds = data["duration_us"] / 1e6
        result.update(
            requests=data["requests"],
            seconds=seconds,
            rps=data["requests"] / seconds if seconds else 0.0,
            p50_ms=lat["p50"] / 1000,
            p75_ms=lat["p75"] / 1000,
            p90_ms=lat["p90"] / 1000,
            p99_ms=lat["p99"] / 1000,
            p999_ms=lat["p999"] / 1000,
            mean_ms=lat["mean"] / 1000,
            max_ms=lat["max"] / 1000,
            bytes=data["bytes"],
            errors=sum(data["errors"].values()),
            error_detail=data["errors"],
        )
    elif rps and total and "50" in text_pct:
        result.update(
            requests=int(total.group(1)),
            rps=float(rps.group(1)),
            p50_ms=text_pct["50"],
            p75_ms=text_pct.get("75"),
            p90_ms=text_pct.get("90"),
            p99_ms=text_pct.get("99"),
            errors=(int(non2xx.group(1)) if non2xx else 0)
            + (sum(int(g) for g in sockerr.groups()) if sockerr else 0),
        )
    else:
        raise BenchError("could not parse wrk's output:\n" + output[-2000:])
    result["text_percentiles_ms"] = text_pct
    if rps:
        result["text_rps"] = float(rps.group(1))
    return result


def wrk_threads(load: Load) -> int:
    """wrk refuses more threads than connections."""
    return max(1, min(load.threads, load.connections))


def wrk_command(
    port: int, path: str, load: Load, *, seconds: int, script: str, cpus: str | None = None
) -> list[str]:
    """
    The command line of every wrk run: ``load`` for ``seconds`` with
    ``script`` (in ``bench/wrk/``), on the CPUs ``cpus`` (``taskset -c``
    syntax) when the load is pinned.  The pause per connection, the body and
    the budget reach the script through the environment (:func:`wrk_env`).
    """
    argv = [
        WRK,
        f"-t{wrk_threads(load)}",
        f"-c{load.connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_DIR / script),
        f"http://{LOOPBACK}:{port}{path}",
    ]
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def wrk_env(workdir: Path, request: Request, load: Load, **extra: str) -> dict[str, str]:
    """The environment post.lua reads: the body (written to a file) and the pause."""
    body_file = workdir / "body.json"
    body_file.write_bytes(json.dumps(request.body).encode())
    env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_LUA_DIR": str(LUA_DIR), **extra}
    if load.delay_ms > 0:
        env["BENCH_DELAY_MS"] = f"{load.delay_ms:.3f}"
    return env


def run_wrk(
    procs: Processes,
    workdir: Path,
    port: int,
    request: Request,
    load: Load,
    seconds: float,
    *,
    label: str,
    cpus: str | None = None,
) -> dict[str, Any]:
    """One wrk run of ``seconds``: its parsed summary, with the load that made it."""
    argv = wrk_command(
        port, request.path, load, seconds=max(1, round(seconds)), script="post.lua", cpus=cpus
    )
    out_path = workdir / "wrk.out"
    out_path.write_bytes(b"")
    process = procs.start(argv, log_path=out_path, env=wrk_env(workdir, request, load))
    try:
        process.wait(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk ({label}) did not finish in time") from None
    finally:
        procs.stop(process)
    output = out_path.read_text(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"wrk ({label}) failed with {process.returncode}:\n{output[-2000:]}")
    result = parse_wrk(output)
    result.update(
        threads=wrk_threads(load),
        connections=load.connections,
        duration_s=seconds,
        delay_ms=load.delay_ms,
    )
    return result


def run_wrk_budget(
    procs: Processes,
    workdir: Path,
    port: int,
    request: Request,
    load: Load,
    *,
    total: int,
    max_seconds: float,
) -> dict[str, Any]:
    """
    Drive exactly ``total`` responses (rounded up to a multiple of the
    threads), however long it takes up to ``max_seconds``.
    """
    markers = Path(tempfile.mkdtemp(prefix="markers-", dir=workdir))
    threads = wrk_threads(load)
    per_thread = math.ceil(total / threads)
    env = wrk_env(workdir, request, load, BENCH_BUDGET=str(per_thread), BENCH_MARKERS=str(markers))
    argv = wrk_command(
        port, request.path, load, seconds=math.ceil(max_seconds), script="budget.lua"
    )
    out_path = workdir / "wrk-budget.out"
    out_path.write_bytes(b"")
    started = time.monotonic()
    process = procs.start(argv, log_path=out_path, env=env)
    finished = False
    try:
        deadline = started + max_seconds + 5
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(markers.iterdir())) >= threads:
                finished = True
                process.send_signal(signal.SIGINT)  # ends wrk's sleep; it prints its summary
                break
            time.sleep(0.05)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk (request budget) did not stop") from None
    finally:
        procs.stop(process)
    output = out_path.read_text(errors="replace")
    result = parse_wrk(output)
    result.update(
        threads=threads,
        connections=load.connections,
        budget=per_thread * threads,
        budget_reached=finished,
        wall_s=time.monotonic() - started,
    )
    return result
