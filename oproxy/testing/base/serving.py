"""
Running a fake as a process: with ``twistd`` (an :class:`Options` base and
the service :func:`fake_service` builds) or standalone from the command line
(:func:`run_standalone`, behind ``python -m oproxy.testing.ollama`` and
``python -m oproxy.testing.openai``).

Under ``twistd`` the listening address is a Twisted endpoint string, so
UNIX sockets and other transports work as well as TCP; with a stats file
the fake's final counters are written there when the process stops: how a
soak learns what a backend generated before it was stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from oproxy.testing.base.server import FakeServer


def write_stats(fake: FakeServer[Any], path: str | Path) -> None:
    """
    End whatever is still running (so the counters are final) and write
    the counters of ``GET /_fake/stats`` to ``path`` as JSON.
    """
    fake.abandon_all()
    text = json.dumps(fake.stats.counters(), indent=2, sort_keys=True)
    Path(path).write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# twistd


class Options(usage.Options):
    """
    What every fake's ``twistd`` command line takes; a fake's own
    :class:`Options` adds ``--listen`` (with its default port) and the rest.
    """

    optParameters = [
        ["token-delay", None, 0.0, "Seconds between streamed tokens.", float],
        ["stats-file", None, None, "Write the final /_fake/stats counters here on stop."],
    ]

    def postOptions(self) -> None:
        if self["token-delay"] < 0:
            raise usage.UsageError("--token-delay must not be negative")


class FakeService(StreamServerEndpointService):
    """
    A fake served at an endpoint (what ``strports.service`` makes); on
    stop, once the port is closed, the counters are written to the stats
    file, when there is one.
    """

    def __init__(
        self, reactor: Any, fake: FakeServer[Any], listen: str, stats_file: str | None
    ) -> None:
        site = Site(fake.resource())  # type: ignore[no-untyped-call]
        super().__init__(serverFromString(reactor, listen), site)  # type: ignore[no-untyped-call]
        self.fake = fake
        self.stats_file = stats_file

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        if self.stats_file is not None:
            path = self.stats_file
            stopped.addCallback(lambda _: write_stats(self.fake, path))
        return stopped


def fake_service(reactor: Any, fake: FakeServer[Any], options: usage.Options) -> IService:
    """
    The service ``makeService`` returns for ``fake``: nothing is bound or
    written before it starts.
    """
    return FakeService(reactor, fake, options["listen"], options["stats-file"])


# --------------------------------------------------------------------------
# Standalone


def run_standalone(
    argv: Sequence[str] | None,
    *,
    prog: str,
    name: str,
    default_port: int,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    build: Callable[[IReactorTime, argparse.Namespace], FakeServer[Any]],
) -> None:
    """
    Parse ``--port``, ``--interface``, ``--token-delay`` and the fake's own
    arguments, build the fake on the real reactor and serve it forever.
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--token-delay", type=float, default=0.0)
    add_arguments(parser)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = build(cast(IReactorTime, reactor), args)
    serve_forever(reactor, fake.resource(), args.port, args.interface, name)


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


# --------------------------------------------------------------------------
# One kind of server as a process, in a few lines


class _Main(Protocol):
    """A ``main``: the command line's arguments, or ``sys.argv``'s."""

    def __call__(self, argv: Sequence[str] | None = None) -> None: ...


#: How a kind's fake is built from the command line: the clock, the bearer
#: key (or ``None``) and the token delay.
KindBuilder = Callable[[IReactorTime, "str | None", float], FakeServer[Any]]


class KindProcess:
    """
    ``twistd`` options, ``makeService`` and a ``main`` for one kind's fake
    (LM Studio, llama.cpp, vLLM...), which differ only in their name, port
    and constructor: ``twistd oproxy-fake-<kind> --listen ... --api-key
    ...`` or ``python -m oproxy.testing.<kind> --port N``.
    """

    def __init__(self, name: str, package: str, default_port: int, build: KindBuilder) -> None:
        self.name = name
        self.package = package
        self.default_port = default_port
        self.build = build
        listen = f"tcp:{default_port}:interface=127.0.0.1"

        class KindOptions(Options):
            optParameters = [
                ["listen", None, listen, "Twisted endpoint description to listen on."],
                ["api-key", None, None, "Require this bearer key (default: none)."],
            ]

        KindOptions.__doc__ = (
            f"Command line of ``twistd oproxy-fake-{package.rsplit('.', 1)[-1]}``."
        )
        self.Options = KindOptions

    def makeService(self, options: usage.Options) -> IService:
        """A service serving the fake on the global reactor's clock."""
        from twisted.internet import reactor

        fake = self.build(cast(IReactorTime, reactor), options["api-key"], options["token-delay"])
        return fake_service(reactor, fake, options)

    def main(self, argv: Sequence[str] | None = None) -> None:
        """Serve the fake on ``127.0.0.1:PORT`` with the real reactor."""

        def arguments(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--api-key", default=None)

        run_standalone(
            argv,
            prog=f"python -m {self.package}",
            name=self.name,
            default_port=self.default_port,
            add_arguments=arguments,
            build=lambda clock, args: self.build(clock, args.api_key, args.token_delay),
        )

    def entry_points(
        self,
    ) -> tuple[
        type[usage.Options],
        Callable[[usage.Options], IService],
        _Main,
    ]:
        """
        What a kind's ``tap`` module publishes: ``twistd``'s ``Options`` and
        ``makeService``, and the ``main`` of ``python -m``.
        """
        return self.Options, self.makeService, self.main
