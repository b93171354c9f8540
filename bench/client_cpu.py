#!/usr/bin/env python3
"""
What one upstream call costs the proxy's HTTP client, in µs of CPU.

``python bench/client_cpu.py`` starts nginx with the benchmark's canned
answers (``oproxybench.upstreams``), then, in this one process, sends
sequential ``POST /api/chat`` calls on kept-alive connections through each
client in turn and reads each answer whole (a protocol that keeps the
pieces, as ``readBody`` does without its warnings), alternating the
clients round after round so that a neighbour's noise on the machine falls
on all of them alike.  It prints the median and the lowest µs of CPU per
call (user + system time of this process; nginx's does not count) for each.

Then the same again in memory: nginx's answer, captured once, is handed to
each lean client's connection as if it had come from the socket, so the
numbers are the client's own code (request, parser, pool, Deferreds)
without the kernel's share and its noise.  ``Agent`` is not measured there.

The clients: Twisted's ``Agent`` over a persistent pool (what ``https://``
backends use), and the package's :class:`oproxy.http11.LeanAgent`.  Other
versions of ``oproxy/http11.py`` join with ``--client NAME=FILE``, for
example the one on ``main`` before a change::

    git show main:oproxy/http11.py > /tmp/http11_main.py
    python bench/client_cpu.py --client main=/tmp/http11_main.py

and ``bench/h11_client.py``, the same client with h11 reading the answers
(``FILE#CLASS`` names another agent class in the file than ``LeanAgent``)::

    python bench/client_cpu.py --client h11=bench/h11_client.py \\
        --client h11-stand-in=bench/h11_client.py#StandInLeanAgent

``--answer stream`` fetches the 300-line NDJSON answer (about 40 KB, read
in several pieces) instead of the non-streamed one.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from oproxybench.common import BenchError, log
from oproxybench.processes import Processes
from oproxybench.upstreams import start_nginx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone  # noqa: E402
from twisted.web.http import PotentialDataLoss  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from oproxy.upstream import BytesProducer, ReusedEndpoints  # noqa: E402

#: What oproxy sends Ollama for a short chat, give or take.
BODY = (
    b'{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}],'
    b'"stream":false,"options":{"temperature":0}}'
)
HEADERS = Headers({b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]})

Call = Callable[[], Awaitable[bytes]]


class Collect(Protocol):
    """An answer's body, whole; ``readBody`` warns on each call with the lean client."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.pieces))
        else:
            self.done.errback(reason)


def load_http11(name: str, path: Path) -> Any:
    """A version of ``oproxy/http11.py`` from a file, as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"_http11_{name}", path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


#: (name, the module, the name of its agent class)
Versions = list[tuple[str, Any, str]]


def build_clients(reactor: Any, url: bytes, versions: Versions) -> dict[str, Call]:
    """One call per client: POST the body, read the answer whole."""
    endpoints = ReusedEndpoints(reactor, 5)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory.noisy = False  # type: ignore[attr-defined]
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    def caller(client: Any) -> Call:
        async def call() -> bytes:
            response = await client.request(b"POST", url, HEADERS, BytesProducer(BODY))
            collect = Collect()
            response.deliverBody(collect)
            body = await collect.done
            if response.code != 200 or not body:
                raise BenchError(f"unexpected answer {response.code}: {body[:80]!r}")
            return body

        return call

    clients = {"agent": caller(agent)}
    for name, module, agent_class in versions:
        lean = getattr(module, agent_class)(endpoints, agent, module.IdleConnections())
        clients[name] = caller(lean)
    return clients


class Replayed:
    """
    A connection's transport in memory: requests are dropped, and
    :meth:`Replay.answer` hands the connection the captured answer.
    """

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        pass

    def abortConnection(self) -> None:
        raise BenchError("the client closed a kept-alive connection")

    loseConnection = abortConnection

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class Replay:
    """An endpoint factory whose one connection answers with ``answer``."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self.transports: list[Replayed] = []

    def endpointForURI(self, uri: Any) -> Replay:
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = Replayed(protocol)
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return defer.succeed(protocol)

    def answer(self) -> None:
        self.transports[-1].protocol.dataReceived(self._answer)


def replaying_clients(url: bytes, answer: bytes, versions: Versions) -> dict[str, Call]:
    """The lean clients, each over its own :class:`Replay`."""
    clients: dict[str, Call] = {}
    for name, module, agent_class in versions:
        replay = Replay(answer)
        lean = getattr(module, agent_class)(replay, None, module.IdleConnections())

        def caller(lean: Any, replay: Replay) -> Call:
            async def call() -> bytes:
                requested = lean.request(b"POST", url, HEADERS, BytesProducer(BODY))
                replay.answer()
                response = await requested
                collect = Collect()
                response.deliverBody(collect)
                body: bytes = await collect.done
                return body

            return call

        clients[name] = caller(lean, replay)
    return clients


def capture(port: int) -> bytes:
    """nginx's whole answer to one ``POST /api/chat``, head and body, as sent."""
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Accept: application/json\r\nContent-Length: %d\r\n\r\n" % (port, len(BODY))
    ) + BODY
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if match is None:
            raise BenchError("nginx's answer has no Content-Length")
        while len(body) < int(match.group(1)):
            body += s.recv(65536)
    return head + b"\r\n\r\n" + body


async def measure(call: Call, calls: int) -> float:
    """µs of CPU per call over ``calls`` sequential calls."""
    gc.collect()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def compare(clients: dict[str, Call], calls: int, rounds: int) -> dict[str, list[float]]:
    """Every client, ``rounds`` times in turn, each time ``calls`` calls."""
    expected = {name: await call() for name, call in clients.items()}
    if len(set(expected.values())) != 1:
        raise BenchError("the clients read different answers")
    for call in clients.values():  # warm up: connections, caches
        for _ in range(max(100, calls // 10)):
            await call()
    names = list(clients)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        # Each round starts with the next client, so none is always first.
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            results[name].append(await measure(clients[name], calls))
        log(
            f"round {round_ + 1}/{rounds}: "
            + ", ".join(f"{name} {results[name][-1]:.1f}" for name in names)
        )
    return results


def report(title: str, results: dict[str, list[float]]) -> None:
    base = statistics.median(results["lean"])
    print(title)
    print(f"{'client':<12} {'median':>8} {'lowest':>8} {'vs lean':>8}   rounds")
    for name, values in results.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:<12} {median:8.1f} {min(values):8.1f} {median / base:8.2f}x   {rounds}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per client per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--answer", choices=("plain", "stream"), default="plain")
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME=FILE[#CLASS]",
        help="another version of oproxy/http11.py to measure (its LeanAgent, or CLASS)",
    )
    args = parser.parse_args()
    import oproxy.http11

    versions: Versions = [("lean", oproxy.http11, "LeanAgent")]
    for spec in args.client:
        name, sep, where = spec.partition("=")
        path, _, agent_class = where.partition("#")
        if not sep or not Path(path).is_file() or name in ("agent", "lean"):
            parser.error(f"--client wants NAME=FILE[#CLASS] (not agent or lean), got {spec!r}")
        versions.append((name, load_http11(name, Path(path)), agent_class or "LeanAgent"))
    procs = Processes()
    sockets: dict[str, list[float]] = {}
    memory: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="oproxy-client-cpu-") as workdir:
            upstream = start_nginx(procs, Path(workdir), stream_lines=300, workers=1)
            port = upstream.plain_port if args.answer == "plain" else upstream.stream_port
            url = f"http://127.0.0.1:{port}/api/chat".encode()
            answer = capture(port)

            async def run(reactor: Any) -> None:
                log("over sockets, against nginx")
                sockets.update(
                    await compare(build_clients(reactor, url, versions), args.calls, args.rounds)
                )
                log("in memory, nginx's answer replayed")
                memory.update(
                    await compare(replaying_clients(url, answer, versions), args.calls, args.rounds)
                )

            task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        procs.stop_all()
    what = f"sequential POST /api/chat, {args.answer} answer, {args.calls} calls a round"
    report(f"µs of CPU per call over a socket to nginx ({what})", sockets)
    report(f"µs of CPU per call in memory, nginx's answer replayed ({what})", memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
