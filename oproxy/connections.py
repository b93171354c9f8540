"""
How many client connections a process holds, and refusing more, cheaply.

Every open connection holds a file descriptor.  A client that opens
thousands of them and trickles bytes (slowloris) would otherwise run the
process out of descriptors: ``accept`` then fails for everyone, health
checks included, and so does every connection to a backend and the state
store.  So a process counts its connections, in total and per client, and
closes a new one at once, before any HTTP machinery is built for it, when a
cap is reached:

* ``limits.max_connections`` in total, lowered when the descriptor limit
  (``RLIMIT_NOFILE``) cannot hold that many: each client connection may
  need a second descriptor for its backend, and :data:`RESERVED_DESCRIPTORS`
  are kept back for listeners, logs, the state store and the master's pipes;
* ``limits.max_connections_per_client`` per client, so that one client
  cannot take every slot: the connections of everyone else (health checks
  from another address, another listener) still get in.

A client is an IPv4 address, an IPv6 ``/64`` (one host or home network
gets a whole ``/64``, so counting single IPv6 addresses would let one
client count as billions), or, for a Unix socket peer, which has no
address, the one bucket ``unix``.  Loopback is counted like any other
address: a local reverse proxy is one client, and deserves a larger
``max_connections_per_client`` set on purpose, not a silent exemption
that would let anything relayed through it take the health checks' slots.

A refusal is logged once, then summed up once a minute at most while
refusals go on; each is counted in ``oproxy_connections_refused_total``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import resource
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from oproxy.config import RequestLimits
from oproxy.metrics import Metrics

log = Logger()

#: Descriptors never handed to client connections: listening sockets, log
#: files, the state store, pipes to the master, upstream connections of
#: health probes.
RESERVED_DESCRIPTORS = 64

#: Raising the soft descriptor limit stops here even when the hard limit is
#: higher (or unlimited): code that walks every possible descriptor, as
#: process spawning may, must stay quick.
DESCRIPTOR_CEILING = 1 << 20

#: Seconds between two summaries of refused connections.
SUMMARY_INTERVAL = 60.0

#: Refusal reasons (the ``reason`` label), named after what was reached.
TOTAL = "max_connections"
PER_CLIENT = "max_connections_per_client"
DESCRIPTORS = "descriptors"

#: Distinct clients remembered per summary: enough to name the busiest one,
#: bounded however many addresses an attack comes from.
_REMEMBERED_CLIENTS = 1024


def client_of(address: Any) -> str:
    """
    The bucket a peer's connections are counted in.

    :param address: the peer's ``IAddress`` (``IPv4Address``,
        ``IPv6Address``, ``UNIXAddress``, ...).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str) or not host:
        return "unix"
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    network = ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))
    return str(network)


def descriptor_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE`` of this process; ``None``: unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_descriptor_limit() -> int | None:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard one (at most
    :data:`DESCRIPTOR_CEILING`), as many daemons do at start.

    The soft limit is often 1024 while the hard one is far higher: a
    process may raise its own soft limit without privileges, and the
    workers the master starts inherit it.

    :return: the soft limit now in force (``None``: unlimited).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = DESCRIPTOR_CEILING if hard == resource.RLIM_INFINITY else hard
    target = min(target, DESCRIPTOR_CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return descriptor_limit()


def connections_within(descriptors: int | None) -> int | None:
    """
    How many client connections ``descriptors`` can hold, keeping
    :data:`RESERVED_DESCRIPTORS` back and one descriptor per connection
    for its backend.  ``None``: no bound.
    """
    if descriptors is None:
        return None
    return max(1, (descriptors - RESERVED_DESCRIPTORS) // 2)


class RefusalLog:
    """
    One log line for the first refused connection, then at most one summary
    per :data:`SUMMARY_INTERVAL` while refusals go on.

    A flood of refused connections must not become a flood of log lines:
    writing them would cost more than refusing.
    """

    def __init__(self, clock: IReactorTime, interval: float = SUMMARY_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._call: IDelayedCall | None = None
        self._reasons: Counter[str] = Counter()
        self._clients: Counter[str] = Counter()
        self._limits: dict[str, int] = {}

    def refused(self, reason: str, client: str, limit: int) -> None:
        self._limits[reason] = limit
        if self._call is None:
            log.warn(
                "Refusing connections from {client}: {reason} ({limit}) reached; "
                "refusals are summed up every {interval:g} seconds while they go on",
                client=client,
                reason=reason,
                limit=limit,
                interval=self._interval,
            )
            self._call = self._clock.callLater(self._interval, self._summarise)
            return
        self._reasons[reason] += 1
        if client in self._clients or len(self._clients) < _REMEMBERED_CLIENTS:
            self._clients[client] += 1

    def _summarise(self) -> None:
        if not self._reasons:
            # A quiet interval: the next refusal is news again.
            self._call = None
            return
        total = sum(self._reasons.values())
        detail = ", ".join(
            f"{count} at {reason} ({self._limits[reason]})"
            for reason, count in self._reasons.most_common()
        )
        busiest, busiest_count = self._clients.most_common(1)[0]
        log.warn(
            "Refused {count} connection(s) in the last {interval:g} seconds: {detail}; "
            "most from {client} ({client_count})",
            count=total,
            interval=self._interval,
            detail=detail,
            client=busiest,
            client_count=busiest_count,
        )
        self._reasons.clear()
        self._clients.clear()
        self._call = self._clock.callLater(self._interval, self._summarise)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class ConnectionLimits:
    """
    The open connections of one process, by client; whether one more fits.

    :param limits: the current limits (a reload may change them; they apply
        to the next connection).
    :param descriptors: the process's descriptor limit (``None``:
        unlimited), which can lower the total.
    """

    def __init__(
        self,
        limits: Callable[[], RequestLimits],
        clock: IReactorTime,
        metrics: Metrics,
        descriptors: int | None,
    ) -> None:
        self._limits = limits
        self._metrics = metrics
        self._by_descriptors = connections_within(descriptors)
        self.refusals = RefusalLog(clock)
        #: Open connections, in total and per client.
        self.open = 0
        self._per_client: dict[str, int] = {}
        configured = limits().max_connections
        if self._by_descriptors is not None and self._by_descriptors < configured:
            log.warn(
                "Only {fit} client connections fit in this process's descriptor limit "
                "({descriptors}, RLIMIT_NOFILE): limits.max_connections ({configured}) "
                "is lowered to that; raise the limit (LimitNOFILE=, ulimit -n) for more",
                fit=self._by_descriptors,
                descriptors=descriptors,
                configured=configured,
            )

    def admit(self, client: str) -> bool:
        """
        Count a new connection from ``client`` if it fits.

        :return: whether it does; a connection that does not is counted as
            refused (and logged), and must be closed at once.
        """
        limits = self._limits()
        total = limits.max_connections
        reason = TOTAL
        if self._by_descriptors is not None and self._by_descriptors < total:
            total, reason = self._by_descriptors, DESCRIPTORS
        held = self._per_client.get(client, 0)
        if self.open >= total:
            self._refuse(reason, client, total)
            return False
        if held >= limits.max_connections_per_client:
            self._refuse(PER_CLIENT, client, limits.max_connections_per_client)
            return False
        self._per_client[client] = held + 1
        self.open += 1
        self._metrics.connections_open.inc()
        return True

    def release(self, client: str) -> None:
        """An admitted connection from ``client`` is closed."""
        held = self._per_client.get(client, 0)
        if held <= 1:
            self._per_client.pop(client, None)
        else:
            self._per_client[client] = held - 1
        self.open -= 1
        self._metrics.connections_open.dec()

    def held_by(self, client: str) -> int:
        """Connections ``client`` holds now."""
        return self._per_client.get(client, 0)

    def _refuse(self, reason: str, client: str, limit: int) -> None:
        self._metrics.connections_refused.labels(reason).inc()
        self.refusals.refused(reason, client, limit)
