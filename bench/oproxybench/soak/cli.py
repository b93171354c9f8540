"""
The soak's command line: the options, one run, the report, and stopping
everything it started whatever happens (an error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from types import FrameType

from ..common import BenchError, log
from ..processes import Processes
from .plan import SHORT, SoakSettings
from .report import render
from .runner import Soak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(
        prog="python bench/soak.py",
        description="Soak oproxy under faults (see bench/README.rst, 'The soak').",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help=f"a {SHORT.minutes:g}-minute smoke run with every fault scaled down "
        f"(reload every {SHORT.reload_every:g} s, kill every {SHORT.kill_every:g} s, "
        f"backend down {SHORT.backend_down:g} s); other options still override",
    )

    def number(name: str, help: str, kind: type = float) -> None:
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=help)

    number("minutes", f"how long the load runs (default {defaults.minutes:g})")
    number("reload_every", f"seconds between config rewrites (default {defaults.reload_every:g})")
    number("kill_every", f"seconds between kill -9 of a worker (default {defaults.kill_every:g})")
    number("backend_down", f"seconds backend b stays stopped (default {defaults.backend_down:g})")
    number("clients", f"client threads (default {defaults.clients})", int)
    number("stream_share", f"share of streamed requests (default {defaults.stream_share:g})")
    number("think", f"longest pause between a client's requests (default {defaults.think:g})")
    number("token_delay", f"the fakes' seconds per token (default {defaults.token_delay:g})")
    number("sample_every", f"seconds between samples (default {defaults.sample_every:g})")
    number("warmup", f"seconds before the first quiet sample (default {defaults.warmup:g})")
    number("drain_streams", f"streams under way at SIGTERM (default {defaults.drain_streams})", int)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory (logs, state, configs)"
    )
    args = parser.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    return args


def settings_from(args: argparse.Namespace) -> SoakSettings:
    """``--short`` or the defaults, with every option given on top."""
    settings = SHORT if args.short else SoakSettings()
    given = {f.name: getattr(args, f.name) for f in fields(SoakSettings) if hasattr(args, f.name)}
    return replace(settings, **{k: v for k, v in given.items() if v is not None})


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """
    Run the soak; the exit status is 0 when every criterion passed, 1 when
    one failed or the run could not be done, 130 when interrupted.
    """
    args = parse_args(argv)
    settings = settings_from(args)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="oproxy-soak-"))
    keep = args.keep
    status = 1
    soak = Soak(procs, workdir, settings)
    log(f"working directory {workdir}")
    try:
        result = soak.run()
        print(render(result), flush=True)
        status = 0 if result.passed else 1
        if args.json:
            Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
            log(f"report written to {args.json}")
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        status = 130
    except BenchError as e:
        log(f"error: {e}")
        keep = True
    finally:
        if soak.load is not None:
            soak.load.stop(timeout=5)
        procs.stop_all()
        if keep or status != 0:
            log(f"logs, state and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status
