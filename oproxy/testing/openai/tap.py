"""
``twistd oproxy-fake-openai`` (:class:`Options`, :func:`makeService`; the
plugin in :mod:`oproxy.service_makers` names this module) and ``python -m
oproxy.testing.openai`` (:func:`main`, also the ``oproxy-fake-openai``
script): the fake OpenAI-compatible server as a process, see :mod:`oproxy.testing.base.serving`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import cast

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime

from oproxy.testing.base import serving
from oproxy.testing.openai.server import FakeOpenAI

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"


class Options(serving.Options):
    """
    Command line of ``twistd oproxy-fake-openai``.
    """

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Twisted endpoint description to listen on."],
        ["api-key", None, None, "Require this bearer key on /v1/* (default: none)."],
    ]
    optFlags = [
        ["no-health", None, "Serve no /health route, as OpenAI and LM Studio do not."],
    ]


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
    return serving.fake_service(reactor, fake, options)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-health", action="store_true", help="serve no /health route")


def _build(clock: IReactorTime, args: argparse.Namespace) -> FakeOpenAI:
    return FakeOpenAI(
        clock,
        api_key=args.api_key,
        token_delay=args.token_delay,
        health_status=None if args.no_health else 200,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    Serve the fake on ``127.0.0.1:PORT`` with the real reactor, printing
    one ``listening on`` line (with the actual port, useful with
    ``--port 0``).
    """
    serving.run_standalone(
        argv,
        prog="python -m oproxy.testing.openai",
        name="fake openai",
        default_port=8000,
        add_arguments=_arguments,
        build=_build,
    )
