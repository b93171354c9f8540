"""
Binding listeners in the master, and adopting them in the workers.

With worker processes the master binds every endpoint itself and hands the
listening sockets to its children.  For TCP-based endpoints (``tcp:``,
``ssl:``, ``tls:``) it binds one socket *per worker* on the same address with
``SO_REUSEPORT``: the kernel then spreads new connections evenly over the
workers, where a single shared socket lets whichever worker woke last take
them all.  The master keeps every socket open, so connections the kernel
has queued on a worker's socket survive that worker's crash and are served
by its replacement, which adopts the same socket.  ``unix:`` and
``systemd:`` sockets cannot be multiplied and are shared.

TLS is not a property of the socket but of the protocol on top, so a worker
re-reads the endpoint string to wrap its factory exactly as a single process
would (:func:`oproxy.certs.tls.server_endpoint`).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from oproxy.certs.tls import server_endpoint


class _NeverAccepts(Factory):
    """The master's factory for shared sockets: the master does not accept."""

    protocol = Protocol
    noisy = False


@dataclass
class Listener:
    """
    One configured endpoint, bound: a socket per worker, or one shared.
    """

    description: str
    sockets: list[socket.socket]

    def fileno_for(self, worker: int) -> int:
        return self.sockets[worker % len(self.sockets)].fileno()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _tls_layers(endpoint: Any) -> tuple[Any, list[Any]]:
    """
    Peel the TLS wrappers off a parsed server endpoint.

    :return: the transport endpoint underneath, and a function per layer
        that wraps a protocol factory the way that layer would.
    """
    layers: list[Any] = []
    while True:
        if hasattr(endpoint, "connectionCreator") and hasattr(endpoint, "endpoint"):
            # tls: on current Twisted (twisted.protocols._sni.TLSServerEndpoint)
            creator, clock = endpoint.connectionCreator, getattr(endpoint, "clock", None)
            extra = {"clock": clock} if clock is not None else {}
            layers.append(
                lambda f, creator=creator, extra=extra: TLSMemoryBIOFactory(
                    creator, False, f, **extra
                )
            )
            endpoint = endpoint.endpoint
        elif isinstance(endpoint, endpoints._WrapperServerEndpoint):
            # tls: on older Twisted
            layers.append(endpoint._wrapperFactory)
            endpoint = endpoint._wrappedEndpoint
        else:
            return endpoint, layers


def _tcp_address(reactor: Any, description: str) -> tuple[str, int, int] | None:
    """
    ``(interface, port, backlog)`` of a TCP-based endpoint, else None.
    """
    endpoint, _ = _tls_layers(server_endpoint(reactor, description))
    if isinstance(endpoint, endpoints._TCPServerEndpoint | endpoints.SSL4ServerEndpoint):
        return endpoint._interface, int(endpoint._port), int(endpoint._backlog)
    return None


def _reuseport_socket(interface: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET
    if interface and ipaddress.ip_address(interface.strip("[]")).version == 6:
        family = socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _shared_socket(reactor: Any, description: str) -> socket.socket:
    results: list[Any] = []
    endpoints.serverFromString(reactor, description).listen(_NeverAccepts()).addBoth(results.append)
    if not results:  # pragma: no cover - every stream endpoint binds at once
        raise RuntimeError(f"endpoint {description!r} did not bind synchronously")
    if not IListeningPort.providedBy(results[0]):
        results[0].raiseException()
    port = results[0]
    port.stopReading()  # the master never accepts
    return socket.socket(fileno=port.socket.detach())


def bind(reactor: Any, description: str, workers: int) -> Listener:
    """
    Bind ``description`` for ``workers`` worker processes.

    :raises OSError: the address cannot be bound.
    """
    address = _tcp_address(reactor, description)
    if address is None:
        return Listener(description, [_shared_socket(reactor, description)])
    interface, port, backlog = address
    sockets = [_reuseport_socket(interface, port, backlog)]
    port = sockets[0].getsockname()[1]  # the same port for all, even if 0 was asked
    try:
        sockets.extend(_reuseport_socket(interface, port, backlog) for _ in range(workers - 1))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return Listener(description, sockets)


def _family(fd: int) -> socket.AddressFamily:
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


def _wrap(reactor: Any, description: str, factory: IProtocolFactory) -> IProtocolFactory:
    """
    The factory a worker must serve ``description`` with: TLS-wrapped or not.
    """
    if description.split(":", 1)[0] in ("systemd", "unix", "tcp", "tcp6"):
        return factory
    # Held to the same TLS policy, and the same certificate directory
    # reading, as a single process (oproxy.certs.tls).
    endpoint, layers = _tls_layers(server_endpoint(reactor, description))
    if isinstance(endpoint, endpoints.SSL4ServerEndpoint):  # ssl:
        factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
    for layer in reversed(layers):
        factory = layer(factory)
    return factory


def adopt(reactor: Any, description: str, fd: int, factory: IProtocolFactory) -> IListeningPort:
    """
    Serve ``factory`` on an inherited listening socket bound by the master.
    """
    port: IListeningPort = reactor.adoptStreamPort(
        fd, _family(fd), _wrap(reactor, description, factory)
    )
    return port
