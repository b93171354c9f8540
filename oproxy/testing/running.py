"""
Serving a fake from the command line (``python -m oproxy.testing.fake_*``).
"""

from __future__ import annotations

import sys
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site


def serve_forever(reactor: Any, resource: IResource, port: int, interface: str, name: str) -> None:
    """
    Serve ``resource`` on ``interface:port`` until the process is stopped,
    printing one ``NAME listening on URL`` line (with the actual port, which
    is what a test wants with ``--port 0``); exit if the port is taken.
    """

    def listening(bound: IListeningPort) -> None:
        address = cast(IPv4Address, bound.getHost())
        sys.stdout.write(f"{name} listening on http://{interface}:{address.port}\n")
        sys.stdout.flush()

    def cannot_listen(failure: Failure) -> None:
        sys.stderr.write(f"{name} cannot listen: {failure.getErrorMessage()}\n")
        reactor.stop()

    site = Site(resource)  # type: ignore[no-untyped-call]
    endpoint = TCP4ServerEndpoint(reactor, port, interface=interface)
    endpoint.listen(site).addCallbacks(listening, cannot_listen)
    reactor.run()
