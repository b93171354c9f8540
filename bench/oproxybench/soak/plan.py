"""
The soak's settings and its timeline: when the configuration is rewritten,
a worker is killed, the backend stops and starts again, and the processes
are sampled, in seconds after the load started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

EventKind = Literal["reload", "kill", "backend-stop", "backend-start", "sample", "quiet-sample"]

#: Which worker is killed: always the same one, so the other serves the
#: whole run and shows whether a long-lived worker's memory stays flat.
KILLED_WORKER = 1


@dataclass(frozen=True)
class SoakSettings:
    """
    One run's settings, as given on the command line.

    :ivar minutes: how long the load runs.
    :ivar reload_every: seconds between rewrites of the configuration file;
        also the period of the API keys (one key per period).
    :ivar kill_every: seconds between ``kill -9``\\ s of a worker.
    :ivar backend_down: seconds the second fake Ollama stays stopped.
    :ivar clients: client threads, each with one request at a time.
    :ivar stream_share: the share of requests that stream.
    :ivar think: the longest pause of a client between two requests.
    :ivar token_delay: the fake Ollamas' pause between streamed tokens.
    :ivar sample_every: seconds between samples of memory and descriptors.
    :ivar warmup: seconds of load before the first (quiet) sample, the
        start the end is compared with.
    :ivar drain_streams: streams under way when the daemon gets ``SIGTERM``.
    """

    minutes: float = 30.0
    reload_every: float = 60.0
    kill_every: float = 300.0
    backend_down: float = 60.0
    clients: int = 6
    stream_share: float = 0.5
    think: float = 0.5
    token_delay: float = 0.05
    sample_every: float = 30.0
    warmup: float = 45.0
    drain_streams: int = 4
    seed: int = 12

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def periods(self) -> int:
        """Reload periods in the run: one API key each."""
        return max(1, math.ceil(self.seconds / self.reload_every))

    def period_of(self, at: float) -> int:
        """The period (and key) of a request started ``at`` seconds into the load."""
        return min(self.periods - 1, max(0, int(at // self.reload_every)))


#: ``--short``: three minutes with every fault still in, scaled down.
SHORT = SoakSettings(
    minutes=3.0,
    reload_every=20.0,
    kill_every=60.0,
    backend_down=20.0,
    sample_every=10.0,
    warmup=15.0,
)


@dataclass(frozen=True)
class Event:
    """Something the timeline does ``at`` seconds after the load started."""

    at: float
    kind: EventKind


def timeline(settings: SoakSettings) -> list[Event]:
    """
    Every event of a run, in order.

    Reloads fall on period boundaries, kills half a period later (never
    while a reload is under way), and the backend stops a quarter into the
    period nearest the middle of the run that has no kill, so that each
    fault's cost lands on a key of its own.  Nothing happens in the last
    few seconds: the load stops at the end and the drain follows.
    """
    end = settings.seconds
    period = settings.reload_every
    events = [Event(settings.warmup, "quiet-sample")]
    events += [Event(k * period, "reload") for k in range(1, settings.periods) if k * period < end]
    kills = [
        at
        for j in range(1, int(end // settings.kill_every) + 1)
        if (at := j * settings.kill_every + period / 2) < end - min(10.0, period / 2)
    ]
    events += [Event(at, "kill") for at in kills]
    killed_periods = {settings.period_of(at) for at in kills}
    stop_period = settings.period_of(end / 2)
    while stop_period > 0 and stop_period in killed_periods:
        stop_period -= 1
    stop = stop_period * period + period / 4
    restart = min(stop + settings.backend_down, end - period / 4)
    if settings.warmup < stop < restart:
        events += [Event(stop, "backend-stop"), Event(restart, "backend-start")]
    sample = settings.sample_every
    events += [
        Event(k * sample, "sample") for k in range(1, int(end // sample) + 1) if k * sample < end
    ]
    order = {"quiet-sample": 0, "sample": 1, "reload": 2, "backend-stop": 3, "backend-start": 4}
    return sorted(events, key=lambda event: (event.at, order.get(event.kind, 5)))
