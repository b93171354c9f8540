"""
One soak, in order: start everything, run the load through the timeline,
drain and stop, then account for what happened (see the package's
docstring for the story).
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..cli import environment_facts
from ..common import BenchError, log
from ..processes import Processes, tail
from .accounting import (
    DEFAULT_COMPLETION_ESTIMATE,
    KILLED,
    SIGTERM,
    STOPPED,
    UNEXPLAINED,
    Criterion,
    Expected,
    FakeTotals,
    KeyAccount,
    account_key,
    cause_of,
    expected_answer,
    flatness,
    prompt_estimate,
)
from .cluster import Cluster, ProcessSample
from .load import MESSAGES, Load, Outcome, client_for, drain_streams, same_answers, send
from .plan import Event, SoakSettings, timeline

PROBE_KEY = "soak-probe"
DRAIN_KEY = "soak-drain"
#: The roles whose process lives the whole run, so whose growth is judged.
LONG_LIVED = ("master", "survivor worker")


def period_key(period: int) -> str:
    return f"soak-{period:03d}"


@dataclass
class SoakResult:
    """Everything one soak found; :meth:`to_json` is the JSON report."""

    meta: dict[str, Any]
    settings: SoakSettings
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    quiet: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    drain: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)
    keys: list[KeyAccount] = field(default_factory=list)
    fakes: FakeTotals = field(default_factory=FakeTotals)
    fake_lives: list[dict[str, Any]] = field(default_factory=list)
    charged: dict[str, Any] = field(default_factory=dict)
    flat: list[Any] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)
    criteria: list[Criterion] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.verdict == "PASS" for c in self.criteria)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def to_json(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.ok]
        return {
            "meta": self.meta,
            "settings": asdict(self.settings),
            "passed": self.passed,
            "criteria": [c.to_json() for c in self.criteria],
            "requests": {
                "sent": len(self.outcomes),
                "ok": len(ok),
                "failed": [o.to_json() for o in self.failures()],
                "latency": latency(self.outcomes),
            },
            "expected": self.expected,
            "keys": [k.to_json() for k in self.keys],
            "charged": self.charged,
            "fakes": self.fakes.to_json(),
            "fake_lives": self.fake_lives,
            "drain": self.drain,
            "events": self.events,
            "quiet_samples": self.quiet,
            "samples": self.samples,
            "flatness": [row.to_json() for row in self.flat],
            "daemon_log": self.log,
        }


def _samples(found: dict[str, ProcessSample]) -> dict[str, Any]:
    return {role: sample.to_json() for role, sample in found.items()}


def latency(outcomes: list[Outcome]) -> dict[str, float | None]:
    """Seconds per successful request, and to the first chunk of a stream."""

    def summary(values: list[float], name: str) -> dict[str, float | None]:
        if not values:
            return {f"{name}_p50": None, f"{name}_p99": None, f"{name}_max": None}
        values = sorted(values)
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        return {
            f"{name}_p50": round(statistics.median(values), 3),
            f"{name}_p99": round(p99, 3),
            f"{name}_max": round(values[-1], 3),
        }

    ok = [o for o in outcomes if o.ok]
    first = [o.first_chunk - o.started for o in ok if o.stream and o.first_chunk is not None]
    return {**summary([o.ended - o.started for o in ok], "s"), **summary(first, "first_chunk_s")}


def meta(workdir: Path) -> dict[str, Any]:
    """The machine and the versions (the benchmark's facts, less nginx and wrk)."""
    facts = environment_facts()
    for tool in ("nginx", "wrk"):
        facts.pop(tool, None)
    try:
        facts["openai"] = version("openai")
    except PackageNotFoundError:
        facts["openai"] = "?"
    return {**facts, "workdir": str(workdir)}


class Soak:
    """The run: its processes, its load and what it records."""

    def __init__(self, procs: Processes, workdir: Path, settings: SoakSettings) -> None:
        self.settings = settings
        self.cluster = Cluster(procs, workdir, settings)
        self.result = SoakResult(meta(workdir), settings)
        self.tokens: dict[str, str] = {}
        self.load: Load | None = None
        self.kills: list[tuple[float, float]] = []
        self.stops: list[tuple[float, float]] = []

    def key_for(self, at: float) -> tuple[str, str]:
        name = period_key(self.settings.period_of(at))
        return name, self.tokens[name]

    def run(self) -> SoakResult:
        settings, cluster = self.settings, self.cluster
        cluster.start_fake("a")
        cluster.start_fake("b")
        cluster.write_config()
        names = [period_key(p) for p in range(settings.periods)] + [PROBE_KEY, DRAIN_KEY]
        log(f"making {len(names)} keys with oproxy keys create")
        self.tokens = cluster.create_keys(names)
        log(f"starting oproxy (workers: 2) on :{cluster.port}")
        cluster.start_daemon()
        self.result.outcomes += self._probe()
        self.load = load = Load(
            cluster.url,
            self.key_for,
            clients=settings.clients,
            stream_share=settings.stream_share,
            think=settings.think,
            seed=settings.seed,
        )
        log(
            f"load: {settings.clients} clients for {settings.minutes:g} min "
            f"({len(timeline(settings))} events planned)"
        )
        load.start()
        try:
            for event in timeline(settings):
                self._wait_until(event.at)
                self._do(event)
            self._wait_until(settings.seconds)
        finally:
            load.stop()
        self.result.outcomes += load.outcomes
        self.result.quiet["end"] = _samples(cluster.sample())
        self._drain()
        self._stop_fakes()
        self._charges(names)
        self.result.log = cluster.log_findings()
        self._account()
        return self.result

    def _probe(self) -> list[Outcome]:
        """
        One whole and one streamed answer before the load, so the daemon
        serves; the first is tried again while the workers finish starting
        (a refused attempt is charged nothing, and is not kept).
        """
        sdk = client_for(self.cluster.url, self.tokens[PROBE_KEY])
        found = []
        deadline = time.monotonic() + 60
        for stream in (False, True):
            while True:
                outcome = send(sdk, Outcome(PROBE_KEY, stream, started=-1.0), lambda: -1.0)
                if outcome.ok or stream or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not outcome.ok:
                raise BenchError(f"the daemon does not answer: {outcome.failure} {outcome.detail}")
            found.append(outcome)
        sdk.close()
        return found

    def _wait_until(self, at: float) -> None:
        assert self.load is not None
        while self.load.now() < at:
            if not self.cluster.alive():
                raise BenchError("the daemon died:\n" + tail(self.cluster.log_path))
            time.sleep(min(0.1, max(0.0, at - self.load.now())))

    def _do(self, event: Event) -> None:
        assert self.load is not None
        cluster, load = self.cluster, self.load
        at = load.now()
        detail: dict[str, Any] = {}
        if event.kind == "reload":
            detail["change"] = cluster.write_config()
        elif event.kind == "kill":
            detail["in_flight"] = load.in_flight
            detail.update(cluster.kill_worker())
            self.kills.append((at, at))
        elif event.kind == "backend-stop":
            detail["in_flight"] = load.in_flight
            detail["counters"] = cluster.stop_fake("b")
            self.stops.append((at, load.now()))
        elif event.kind == "backend-start":
            cluster.start_fake("b")
        elif event.kind == "quiet-sample":
            drained = load.pause()
            self.result.quiet["start"] = _samples(cluster.sample())
            load.resume()
            detail["drained"] = drained
        elif event.kind == "sample":
            self.result.samples.append({"at": round(at, 1), **_samples(cluster.sample())})
        record = {"kind": event.kind, "planned": event.at, "at": round(at, 2), **detail}
        self.result.events.append(record)
        if event.kind != "sample":
            log(f"  {at:7.1f}s {event.kind} {json.dumps(detail)[:150]}")

    def _drain(self) -> None:
        """Streams under way, SIGTERM in their middle: they must finish and be charged."""
        assert self.load is not None
        log(f"drain: {self.settings.drain_streams} streams, then SIGTERM to the daemon")
        exit_info: dict[str, Any] = {}

        def terminate() -> None:
            exit_info["sent_at"] = round(self.load.now(), 2) if self.load else None
            exit_info.update(self.cluster.terminate())

        outcomes = drain_streams(
            self.cluster.url,
            (DRAIN_KEY, self.tokens[DRAIN_KEY]),
            self.settings.drain_streams,
            self.load.now,
            terminate,
        )
        self.result.drain = {**exit_info, "streams": len(outcomes)}
        self.result.outcomes += outcomes
        log(f"  daemon exited with {exit_info.get('exit_status')} in {exit_info.get('seconds')}s")

    def _stop_fakes(self) -> None:
        for name in ("a", "b"):
            self.cluster.stop_fake(name)
        for fake in self.cluster.fakes.values():
            for life, path in enumerate(fake.lives, 1):
                counters = json.loads(path.read_text())
                self.result.fakes.add(counters)
                self.result.fake_lives.append({"fake": fake.name, "life": life, **counters})

    def _charges(self, names: list[str]) -> None:
        shown = self.cluster.key_usage(names)
        monthly = {name: shown[name]["usage"]["monthly_tokens"] for name in names}
        daily = {name: shown[name]["usage"]["daily_tokens"] for name in names}
        self.result.charged = {
            "by_key": monthly,
            "total": sum(monthly.values()),
            "daily_total": sum(daily.values()),
            "note": ""
            if daily == monthly
            else "the day changed during the run (UTC): the monthly counters are used",
        }

    def _account(self) -> None:
        result, settings = self.result, self.settings
        drain = [o for o in result.outcomes if o.key == DRAIN_KEY]
        expected = expected_answer(result.outcomes)
        if expected is None:
            raise BenchError("not one request succeeded")
        result.expected = dict(expected)
        same_answers(result.outcomes, expected)
        for outcome in result.failures():
            if outcome in drain:
                outcome.cause = SIGTERM
            elif outcome.failure in ("wrong answer", "no usage"):
                outcome.cause = UNEXPLAINED
            else:
                outcome.cause = cause_of(outcome, self.kills, self.stops)
        usage = expected["prompt_tokens"] + expected["completion_tokens"]
        prompt = prompt_estimate(MESSAGES)
        cost = Expected(
            usage=usage,
            reserved=prompt + DEFAULT_COMPLETION_ESTIMATE,
            prompt_reserved=prompt,
            completion=expected["completion_tokens"],
        )
        result.expected.update(usage=usage, reservation=cost.reserved, prompt_estimate=prompt)
        by_key = result.charged["by_key"]
        period = settings.reload_every
        windows = {
            period_key(p): f"{p * period:g}-{(p + 1) * period:g} s" for p in range(settings.periods)
        }
        windows |= {PROBE_KEY: "before the load", DRAIN_KEY: "SIGTERM at the end"}
        for key, window in windows.items():
            mine = [o for o in result.outcomes if o.key == key]
            result.keys.append(account_key(key, window, mine, by_key.get(key), cost))
        result.flat = flatness(
            result.quiet.get("start", {}), result.quiet.get("end", {}), LONG_LIVED
        )
        self._failed_by_fault()
        result.criteria = criteria(result, cost, len(self.kills))

    def _failed_by_fault(self) -> None:
        """For each kill and backend stop, how many requests it failed."""
        faults = iter(self.kills), iter(self.stops)
        for event in self.result.events:
            if event["kind"] not in ("kill", "backend-stop"):
                continue
            start, end = next(faults[event["kind"] == "backend-stop"])
            cause = STOPPED if event["kind"] == "backend-stop" else KILLED
            event["failed"] = sum(
                1
                for o in self.result.failures()
                if o.cause == cause and o.started <= end + 0.05 and start - 0.05 <= o.ended
            )


def criteria(result: SoakResult, cost: Expected, kills: int) -> list[Criterion]:
    """The verdict, one line per promise the issue makes."""
    failures = result.failures()
    causes = Counter(o.cause for o in failures)
    drain = [o for o in result.outcomes if o.key == DRAIN_KEY]
    delivered = sum(1 for o in result.outcomes if o.ok)
    lost = result.fakes.completed - delivered
    found: list[Criterion] = []

    def add(name: str, passed: bool, detail: str) -> None:
        found.append(Criterion(name, "PASS" if passed else "FAIL", detail))

    allowed = causes.get(KILLED, 0) + causes.get(STOPPED, 0)
    add(
        "only requests in flight at a fault failed",
        allowed == len(failures),
        f"{len(result.outcomes)} sent, {len(failures)} failed: "
        + ", ".join(f"{n} {cause}" for cause, n in sorted(causes.items()))
        if failures
        else f"{len(result.outcomes)} sent, none failed",
    )
    wrong_keys = [k.key for k in result.keys if k.verdict == "WRONG"]
    add(
        "tokens charged = tokens generated for every request that completed",
        not wrong_keys,
        "every key exact or explained by its failed requests"
        if not wrong_keys
        else "keys not accounted for: " + ", ".join(wrong_keys),
    )
    consistent = result.fakes.tokens == result.fakes.completed * cost.usage
    add(
        "the fakes' counts agree with the answers",
        consistent and 0 <= lost <= causes.get(KILLED, 0),
        f"{result.fakes.completed} generations completed x {cost.usage} tokens "
        f"{'=' if consistent else '!='} {result.fakes.tokens} generated; "
        f"{lost} finished upstream but lost with a killed worker",
    )
    drained = all(o.ok for o in drain) and len(drain) == result.settings.drain_streams
    drain_key = next((k for k in result.keys if k.key == "soak-drain"), None)
    exact = drain_key is not None and drain_key.verdict == "exact"
    status = result.drain.get("exit_status")
    add(
        "streams under way at SIGTERM finish and are charged their real tokens",
        # twistd exits by the signal that stopped it, once it has stopped cleanly
        drained and exact and status in (0, -signal.SIGTERM),
        f"{sum(o.ok for o in drain)}/{len(drain)} finished; daemon exit status {status} "
        f"after {result.drain.get('seconds')}s; "
        + (
            "charged exactly"
            if exact
            else f"charged {drain_key.charged if drain_key else '?'} instead of "
            f"{drain_key.expected if drain_key else '?'} ({drain_key.note if drain_key else ''})"
        ),
    )
    judged = [row for row in result.flat if row.verdict != "(not judged)"]
    for what in ("RSS KiB", "descriptors (not to backends)"):
        rows = [row for row in judged if row.what == what]
        add(
            "memory flat (within 10%)" if what == "RSS KiB" else "open descriptors flat",
            bool(rows) and all(row.verdict == "PASS" for row in rows),
            "; ".join(f"{row.role} {row.start} -> {row.end} ({row.change})" for row in rows),
        )
    reloads = sum(1 for e in result.events if e["kind"] == "reload")
    by_worker = result.log.get("reloads_by_worker", {})
    add(
        "every reload reached every worker",
        len(by_worker) >= 2 and all(n >= reloads for n in by_worker.values()),
        f"{reloads} rewrites; the master saw {result.log.get('file_changes_seen')}; "
        f"reloaded by worker: {by_worker}",
    )
    replaced = [e for e in result.events if e["kind"] == "kill" and e.get("replaced_after_s")]
    add(
        "every killed worker was replaced",
        len(replaced) == kills,
        ", ".join(
            f"new process after {e['replaced_after_s']} s, serving after {e['serving_after_s']} s"
            for e in replaced
        )
        or "no kill",
    )
    return found
