"""
``twistd`` support for the fake OpenAI server: :class:`Options` and
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

from oproxy.testing.fake_openai import FakeOpenAI

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"


class Options(usage.Options):
    """
    Command line of ``twistd fake-openai``.
    """

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Twisted endpoint description to listen on."],
        ["api-key", None, None, "Require this bearer key on /v1/* (default: none)."],
        ["token-delay", None, 0.0, "Seconds between streamed chunks.", float],
    ]
    optFlags = [
        ["no-health", None, "Serve no /health route, as OpenAI and LM Studio do not."],
    ]

    def postOptions(self) -> None:
        if self["token-delay"] < 0:
            raise usage.UsageError("--token-delay must not be negative")


def makeService(options: Options) -> IService:
    """
    A service serving a :class:`FakeOpenAI` (on the global reactor's clock)
    at ``options["listen"]``.
    """
    from twisted.internet import reactor

    fake = FakeOpenAI(
        cast(IReactorTime, reactor),
        api_key=options["api-key"],
        token_delay=options["token-delay"],
        health_status=None if options["no-health"] else 200,
    )
    site = Site(fake.resource())  # type: ignore[no-untyped-call]
    service: IService = strports.service(options["listen"], site)
    return service
