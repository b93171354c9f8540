"""
Instructions per request, counted by callgrind: a cost measure that CPU steal
cannot move.

Timings on a shared VM can move 2x within an hour; the number of machine
instructions a request costs does not.  This runs the real daemon under
``valgrind --tool=callgrind`` with collection off, warms it up, switches
collection on for exactly ``--requests`` sequential requests sent over one
keep-alive connection, switches it off again, and divides.  Given several
checkouts (``--code DIR``), it measures each in turn, alternating, in the
same run, against the same canned nginx upstream, so their ratio says
whether a change made the request path cheaper or dearer.

Usage (after ``apt-get install -y valgrind nginx-light``)::

    python bench/instructions.py --code /path/to/old --code . --requests 300

``--extra-config FILE`` appends a YAML fragment to every daemon's
configuration (a ``plugins:`` section, say), to measure what it costs.

Python under callgrind runs about fifty times slower: a few hundred
requests give a stable figure (the spread between repeats is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BenchError, log
from .daemon import twistd_path
from .probes import request_for
from .processes import Processes, free_port, tail, wait_for_port
from .ttfb import RawClient
from .upstreams import start_nginx

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"

#: The events of the whole run; ``summary:`` counts only the last dump's part.
_TOTALS = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)


def _control(pid: int, *arguments: str) -> None:
    subprocess.run(
        [CALLGRIND_CONTROL, *arguments, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


def _send(client: RawClient, raw: bytes, count: int) -> None:
    for _ in range(count):
        status, _first, _last = client.request(raw)
        if status != 200:
            raise BenchError(f"a measured request answered HTTP {status}")


def measure_once(
    procs: Processes,
    workdir: Path,
    code: Path,
    upstream_port: int,
    scenario: str,
    requests: int,
    warmup: int,
    extra_config: str = "",
) -> float:
    """Instructions per request of the checkout at ``code``, one daemon run."""
    port = free_port()
    tag = f"{code.name or 'code'}-{time.monotonic_ns()}"
    config = workdir / f"oproxy-{tag}.yaml"
    config.write_text(
        f'listen: ["tcp:{port}:interface=127.0.0.1"]\n'
        f'backends: [{{name: bench, type: ollama, url: "http://127.0.0.1:{upstream_port}"}}]\n'
        "workers: 1\n"
        "cache: {enabled: false}\n" + extra_config
    )
    out = workdir / f"callgrind-{tag}.out"
    log_path = workdir / f"oproxy-{tag}.log"
    argv = [
        VALGRIND,
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        twistd_path(),
        "-n",
        "--pidfile=",
        "--logfile=-",
        "oproxy",
        "--config",
        str(config),
    ]
    env = {**os.environ, "PYTHONPATH": str(code)}
    process = procs.start(argv, log_path=log_path, cwd=workdir, env=env)
    try:
        wait_for_port(port, process, log_path, 600)
        request = request_for(scenario, "w1")
        payload = json.dumps(request.body).encode()
        raw = (
            f"POST {request.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        client = RawClient(port, timeout=120)
        client.connect()
        try:
            _send(client, raw, warmup)
            _control(process.pid, "--instr=on")
            _send(client, raw, requests)
            _control(process.pid, "--instr=off")
        finally:
            client.close()
    finally:
        procs.stop(process, grace=120)
    data = out.read_bytes() if out.exists() else b""
    match = _TOTALS.search(data)
    if match is None:
        raise BenchError(f"no callgrind totals in {out}:\n{tail(log_path)}")
    return int(match.group(1)) / requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--code",
        action="append",
        type=Path,
        help="a checkout to measure (repeatable; default: this one)",
    )
    parser.add_argument("--requests", type=int, default=300, help="measured requests (300)")
    parser.add_argument("--warmup", type=int, default=50, help="requests before counting (50)")
    parser.add_argument("--repeats", type=int, default=2, help="daemon runs per checkout (2)")
    parser.add_argument(
        "--scenario", choices=("chat", "stream", "embed"), default="chat", help="(chat)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--extra-config", type=Path, help="a YAML fragment appended to every daemon's config"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codes = [c.resolve() for c in (args.code or [Path(__file__).resolve().parents[2]])]
    extra_config = args.extra_config.read_text() if args.extra_config else ""
    for tool in (VALGRIND, CALLGRIND_CONTROL):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} not found: apt-get install -y valgrind")
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="oproxy-instructions-"))
    counts: dict[str, list[float]] = {str(c): [] for c in codes}
    try:
        upstream = start_nginx(procs, workdir, stream_lines=300, workers=1)
        port = upstream.stream_port if args.scenario == "stream" else upstream.plain_port
        for repeat in range(args.repeats):
            for code in codes:
                per_request = measure_once(
                    procs,
                    workdir,
                    code,
                    port,
                    args.scenario,
                    args.requests,
                    args.warmup,
                    extra_config,
                )
                counts[str(code)].append(per_request)
                log(f"{code} (run {repeat + 1}): {per_request:,.0f} instructions per request")
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    baseline = statistics.median(counts[str(codes[0])])
    print(f"Instructions per {args.scenario} request ({args.requests} measured, callgrind)")
    for code in codes:
        runs = counts[str(code)]
        median = statistics.median(runs)
        spread = (max(runs) - min(runs)) / median * 100 if median else 0.0
        print(
            f"  {code}: {median:,.0f} (runs: {', '.join(f'{r:,.0f}' for r in runs)}; "
            f"spread {spread:.1f} %; x{median / baseline:.3f} of the first)"
        )
    if args.json:
        args.json.write_text(json.dumps({"scenario": args.scenario, "counts": counts}, indent=2))
    return 0
