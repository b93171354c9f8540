"""
``twistd oproxy-fake-ollama`` (:class:`Options`, :func:`makeService`; the
plugin in :mod:`oproxy.service_makers` names this module) and ``python -m
oproxy.testing.ollama`` (:func:`main`, also the ``oproxy-fake-ollama``
script): the fake Ollama as a process, see :mod:`oproxy.testing.base.serving`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import cast

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from oproxy.testing.base import serving
from oproxy.testing.ollama.server import FakeOllama

DEFAULT_LISTEN = "tcp:11434:interface=127.0.0.1"


class Options(serving.Options):
    """
    Command line of ``twistd oproxy-fake-ollama``.
    """

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Twisted endpoint description to listen on."],
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
        super().postOptions()
        if self["host-check"] and self["no-host-check"]:
            raise usage.UsageError("give only one of --host-check and --no-host-check")
        self["host_check"] = bool(self["host-check"])


def makeService(options: Options) -> IService:
    """
    A service serving a :class:`FakeOllama` (on the global reactor's clock)
    at ``options["listen"]``.
    """
    from twisted.internet import reactor

    clock = cast(IReactorTime, reactor)
    fake = FakeOllama(clock, token_delay=options["token-delay"], host_check=options["host_check"])
    return serving.fake_service(reactor, fake, options)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-check", action="store_true")


def _build(clock: IReactorTime, args: argparse.Namespace) -> FakeOllama:
    return FakeOllama(clock, token_delay=args.token_delay, host_check=args.host_check)


def main(argv: Sequence[str] | None = None) -> None:
    """
    Serve the fake on ``127.0.0.1:PORT`` with the real reactor, printing
    one ``listening on`` line (with the actual port, useful with
    ``--port 0``) and nothing else.
    """
    serving.run_standalone(
        argv,
        prog="python -m oproxy.testing.ollama",
        name="fake ollama",
        default_port=11434,
        add_arguments=_arguments,
        build=_build,
    )
