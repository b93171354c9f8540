"""
``twistd`` support for the fake Ollama server: :class:`Options` and
:func:`makeService`, so the fake can run as a daemon next to the proxy in
end-to-end setups (a ``twisted/plugins`` entry can point at this module).

The listening address is a Twisted endpoint string, so UNIX sockets and
other transports work as well as TCP.
"""

from __future__ import annotations

from typing import cast

from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.web.server import Site

from oproxy.testing.fake_ollama import FakeOllama

DEFAULT_LISTEN = "tcp:11434:interface=127.0.0.1"


class Options(usage.Options):
    """
    Command line of ``twistd fake-ollama``.
    """

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Twisted endpoint description to listen on."],
        ["token-delay", None, 0.0, "Seconds between streamed tokens.", float],
    ]
    optFlags = [
        ["host-check", None, "Refuse requests whose Host header Ollama would refuse (403)."],
        ["no-host-check", None, "Accept any Host header (the default)."],
    ]

    def postOptions(self) -> None:
        """
        Resolve the ``--host-check``/``--no-host-check`` pair into a single
        boolean ``host_check`` (off unless asked for; giving both is an
        error).
        """
        if self["host-check"] and self["no-host-check"]:
            raise usage.UsageError("give only one of --host-check and --no-host-check")
        self["host_check"] = bool(self["host-check"])
        if self["token-delay"] < 0:
            raise usage.UsageError("--token-delay must not be negative")


def makeService(options: Options) -> IService:
    """
    A service serving a :class:`FakeOllama` (on the global reactor's clock)
    at ``options["listen"]``.
    """
    from twisted.internet import reactor

    fake = FakeOllama(
        cast(IReactorTime, reactor),
        token_delay=options["token-delay"],
        host_check=options["host_check"],
    )
    site = Site(fake.resource())  # type: ignore[no-untyped-call]
    service: IService = strports.service(options["listen"], site)
    return service
