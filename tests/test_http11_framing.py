"""
The lean HTTP/1.1 client's framing, proved over generated conversations.

A kept-alive connection carries one answer after another; if the client
misread where one answer ends, the next caller would get the rest of
someone else's answer.  These tests drive :class:`oproxy.http11.LeanAgent`
in memory (no sockets: the test is the server and decides how the bytes
are cut) through conversations that mix Content-Length, chunked,
close-delimited and bodiless answers, interim 1xx answers, HTTP/1.0 and
``Connection: close``, split at arbitrary bytes -- and, for a fixed
conversation, at every byte -- and check that every caller gets exactly
its own answer, that a connection is reused exactly when HTTP says it may
be, and that a server sending more than its answer never reaches the next
caller.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from oproxy.http11 import IdleConnections, LeanAgent
from oproxy.upstream import BytesProducer

ORIGIN = b"http://backend.test:11434"
#: Headers the client keeps to itself (framing and connection management).


class Wire:
    """
    A connection's transport, in memory.  As with a TCP transport, closing
    it is noticed by the protocol on a later turn of the reactor: the test
    decides when, through :meth:`Conversation.settle`.
    """

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.written = bytearray()
        self.closed_by_client = False
        self.closed_by_server = False
        self.lost = False
        self.paused = False

    def write(self, data: bytes) -> None:
        # Twisted drops writes to an aborted connection; a request written
        # there is lost, so the client must not choose such a connection.
        assert not self.closed_by_client, "a request went out on a connection the client closed"
        assert not self.closed_by_server, "a request went out on a connection the server closed"
        self.written += data

    def abortConnection(self) -> None:
        self.closed_by_client = True

    loseConnection = abortConnection

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def settle(self) -> None:
        """Deliver the end of the connection, once, if either side closed it."""
        if self.lost or not (self.closed_by_client or self.closed_by_server):
            return
        self.lost = True
        if self.closed_by_client:
            self.protocol.connectionLost(Failure(error.ConnectionAborted()))
        else:
            self.protocol.connectionLost(Failure(error.ConnectionDone()))


class Endpoints:
    """An ``IAgentEndpointFactory`` whose every connection is a :class:`Wire`."""

    def __init__(self) -> None:
        self.wires: list[Wire] = []

    def endpointForURI(self, uri: Any) -> Endpoints:
        assert uri.host == b"backend.test" and uri.port == 11434
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        wire = Wire(protocol)
        self.wires.append(wire)
        protocol.makeConnection(wire)
        return defer.succeed(protocol)


class Fallback:
    def request(self, *args: Any) -> Any:
        raise AssertionError("a plain-HTTP request went to the fallback agent")


class Body(Protocol):
    """Keeps the body's pieces and how it ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        assert self.reason is None, "body data after the body ended"
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        assert self.reason is None, "the body ended twice"
        self.reason = reason


# -- answers ------------------------------------------------------------------


@dataclass
class Answer:
    """One answer as the server sends it, and what its caller should see."""

    method: bytes
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # length | chunked | close | empty
    interim: list[int] = field(default_factory=list)
    close: bool = False  # "Connection: close"
    chunks: list[int] = field(default_factory=list)  # chunk sizes, for chunked
    extension: bool = False  # chunk extensions
    trailer: bool = False
    surplus: bytes = b""  # bytes the server sends after its answer

    def wire_bytes(self) -> bytes:
        out = bytearray()
        for code in self.interim:
            out += b"HTTP/1.1 %d Interim\r\nLink: </style.css>; rel=preload\r\n\r\n" % code
        out += self.version + b" %d " % self.status + self.reason + b"\r\n"
        for name, value in self.headers:
            out += name + b": " + value + b"\r\n"
        if self.close:
            out += b"Connection: close\r\n"
        elif self.version == b"HTTP/1.1":
            out += b"Connection: keep-alive\r\n"
        if self.framing == "length" or (self.framing == "empty" and self.method == b"HEAD"):
            out += b"Content-Length: %d\r\n" % len(self.body)
        elif self.framing == "chunked":
            out += b"Transfer-Encoding: chunked\r\n"
        out += b"\r\n"
        if self.method == b"HEAD" or self.framing == "empty":
            pass
        elif self.framing == "chunked":
            at = 0
            for size in self.chunks:
                out += b"%X" % size + (b";name=value" if self.extension else b"") + b"\r\n"
                out += self.body[at : at + size] + b"\r\n"
                at += size
            out += b"0\r\n" + (b"X-Checksum: 1234\r\n" if self.trailer else b"") + b"\r\n"
        else:
            out += self.body
        return bytes(out + self.surplus)

    @property
    def expected_body(self) -> bytes:
        return b"" if self.method == b"HEAD" or self.framing == "empty" else self.body

    @property
    def keeps_connection(self) -> bool:
        """Whether HTTP lets the client send its next request on this connection."""
        return (
            self.version == b"HTTP/1.1"
            and not self.close
            and self.framing != "close"
            and not self.surplus
        )

    @property
    def server_closes(self) -> bool:
        return self.close or self.version == b"HTTP/1.0" or self.framing == "close"


HEADERS = st.lists(
    st.tuples(
        st.sampled_from([b"Content-Type", b"date", b"X-Request-Id", b"Server", b"vary"]),
        st.sampled_from([b"", b"application/json", b"a, b;q=0.5", b'"quoted" value', b"nginx"]),
    ),
    max_size=4,
)
METHODS = st.sampled_from([b"POST", b"POST", b"GET", b"HEAD"])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])
PHRASES = st.sampled_from([b"OK", b"Something Else", b""])
INTERIM = st.lists(st.sampled_from([100, 102, 103]), max_size=2)
BODIES = st.binary(max_size=200)
CUTS = st.lists(st.integers(0, 200), max_size=6)


@st.composite
def answers(draw: st.DrawFn, surplus: bool = False) -> Answer:
    method = draw(METHODS)
    version = draw(VERSIONS)
    framings = ["length", "empty"]
    if method != b"HEAD":  # a HEAD answer has no body to end with the connection
        framings.append("close")
    if version == b"HTTP/1.1":
        framings.append("chunked")
    framing = draw(st.sampled_from(framings))
    status = draw(st.sampled_from([204, 304] if framing == "empty" else [200, 201, 404, 500]))
    body = draw(BODIES)
    chunks: list[int] = []
    if framing == "chunked" and body:
        # Chunk boundaries anywhere in the body: sizes that add up to it.
        bounds = sorted({0, len(body), *(c % len(body) for c in draw(CUTS))})
        chunks = [b - a for a, b in itertools.pairwise(bounds)]
    answer = Answer(
        method=method,
        version=version,
        status=status,
        reason=draw(PHRASES),
        headers=draw(HEADERS),
        body=body,
        framing=framing,
        interim=draw(INTERIM),
        close=draw(st.booleans()) if version == b"HTTP/1.1" else False,
        chunks=chunks,
        extension=draw(st.booleans()),
        trailer=draw(st.booleans()),
    )
    # Bytes after an answer whose end is known: the next answer sent too
    # early, or junk.  A close-delimited body takes them as its own.
    if surplus and framing != "close" and not answer.server_closes and draw(st.booleans()):
        answer.surplus = draw(
            st.sampled_from([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", b"x"])
        )
    return answer


# -- the conversation -------------------------------------------------------------


class Conversation:
    """Sends requests one after another and plays the server's answers."""

    def __init__(self) -> None:
        self.endpoints = Endpoints()
        self.idle = IdleConnections()
        self.agent = LeanAgent(self.endpoints, Fallback(), self.idle)
        self.last: Wire | None = None
        self.reusable = False  # whether the last answer left its connection open

    def settle(self) -> None:
        """The reactor's next turn: connections that were closed are lost."""
        for wire in self.endpoints.wires:
            wire.settle()

    def exchange(
        self, answer: Answer, positions: list[int] | None, body_after: int, settle_first: bool
    ) -> None:
        """
        One request and its answer.

        :param positions: where the answer's bytes are cut into the pieces
            the server sends, each a separate ``dataReceived`` (at every
            byte when None).
        :param body_after: how many pieces arrive before the caller asks
            for the body (the response may be there sooner or later).
        :param settle_first: whether connections closed by the last
            exchange are noticed before this request is sent, or after.
        """
        if settle_first:
            self.settle()
        wires_before = len(self.endpoints.wires)
        written_before = {id(w): len(w.written) for w in self.endpoints.wires}
        payload = None if answer.method != b"POST" else b'{"model":"m"}'
        requested = self.agent.request(
            answer.method,
            ORIGIN + b"/api/chat",
            Headers({b"content-type": [b"application/json"]}),
            BytesProducer(payload) if payload is not None else None,
        )
        wires = [w for w in self.endpoints.wires if len(w.written) > written_before.get(id(w), 0)]
        assert len(wires) == 1, "the request went out exactly once"
        (wire,) = wires
        reused = len(self.endpoints.wires) == wires_before
        assert reused == self.reusable, "HTTP said the connection was reusable, or not"
        assert reused == (self.last is wire)
        self._check_request(bytes(wire.written[written_before.get(id(wire), 0) :]), answer)
        self.settle()
        outcome: list[Any] = []
        requested.addBoth(outcome.append)
        body = Body()
        delivered = False
        pieces = cut(answer.wire_bytes(), positions)
        for index, piece in enumerate(pieces):
            if index == body_after and outcome and not delivered:
                self._deliver(outcome[0], body)
                delivered = True
            if wire.closed_by_client:
                break  # the client gave up on this connection: it reads no more
            wire.protocol.dataReceived(piece)
        if answer.server_closes:
            wire.closed_by_server = True
        self.settle()
        assert outcome, "the answer's Deferred never fired"
        if not delivered:
            self._deliver(outcome[0], body)
        self._check_answer(outcome[0], body, answer, wire)
        self.last = wire
        self.reusable = answer.keeps_connection

    @staticmethod
    def _deliver(response: Any, body: Body) -> None:
        if not isinstance(response, Failure):
            response.deliverBody(body)

    @staticmethod
    def _check_request(sent: bytes, answer: Answer) -> None:
        head, sep, rest = sent.partition(b"\r\n\r\n")
        assert sep, "the request's head is whole"
        assert head.startswith(answer.method + b" /api/chat HTTP/1.1\r\n")
        lines = head.lower().split(b"\r\n")
        assert b"host: backend.test:11434" in lines
        if answer.method == b"POST":
            assert b"content-length: %d" % len(rest) in lines
        else:
            assert rest == b""

    def _check_answer(self, response: Any, body: Body, answer: Answer, wire: Wire) -> None:
        assert not isinstance(response, Failure), response
        assert response.code == answer.status and response.phrase == answer.reason
        seen: dict[bytes, list[bytes]] = {}
        for name, values in response.headers.getAllRawHeaders():
            seen[name.lower()] = list(values)
        expected: dict[bytes, list[bytes]] = {}
        for name, value in answer.headers:
            expected.setdefault(name.lower(), []).append(value)
        assert seen == expected
        if answer.framing == "length" or answer.framing == "empty":
            length = len(answer.body) if answer.framing == "length" else 0
            assert response.length == (0 if answer.method == b"HEAD" else length)
        else:
            assert response.length is (0 if answer.method == b"HEAD" else UNKNOWN_LENGTH)
        assert body.reason is not None, "the body never ended"
        if answer.surplus:
            # Either the answer ended where its framing said, or it failed;
            # never does the surplus reach this caller or the next one.
            if body.reason.check(ResponseFailed) is None:
                assert body.reason.check(ResponseDone) and body.data == answer.expected_body
            assert wire.closed_by_client, "a connection with bytes nobody asked for was kept"
            return
        assert bytes(body.data) == answer.expected_body
        if answer.framing == "close" and answer.method != b"HEAD":
            assert body.reason.check(http.PotentialDataLoss)
        else:
            assert body.reason.check(ResponseDone)
        if answer.keeps_connection:
            assert not wire.closed_by_client, "a reusable connection was closed"


def cut(data: bytes, positions: list[int] | None) -> list[bytes]:
    """``data`` in pieces, cut at ``positions``; at every byte when None."""
    if positions is None:
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted({p for p in positions if 0 < p < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


EVERY_BYTE = None


@st.composite
def exchanges(draw: st.DrawFn, surplus: bool = False) -> tuple[Answer, list[int] | None, int, bool]:
    answer = draw(answers(surplus=surplus))
    size = len(answer.wire_bytes())
    positions = draw(
        st.one_of(
            st.lists(st.integers(1, max(1, size - 1)), max_size=8),
            st.just([]),
            st.just(EVERY_BYTE),
        )
    )
    return answer, positions, draw(st.integers(0, 10)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(exchanges(), min_size=1, max_size=8))
def test_every_caller_gets_its_own_answer(conversation: list[Any]) -> None:
    talk = Conversation()
    for answer, positions, body_after, settle_first in conversation:
        talk.exchange(answer, positions, body_after, settle_first)


@settings(max_examples=200, deadline=None)
@given(st.lists(exchanges(surplus=True), min_size=1, max_size=6))
def test_bytes_after_an_answer_never_reach_the_next_caller(conversation: list[Any]) -> None:
    talk = Conversation()
    for answer, positions, body_after, settle_first in conversation:
        talk.exchange(answer, positions, body_after, settle_first)


def _fixed_conversation() -> list[Answer]:
    """One of each: the answers an Ollama or llama.cpp server sends, and HTTP's odd ones."""
    json_headers = [(b"Content-Type", b"application/json; charset=utf-8")]
    return [
        Answer(b"POST", b"HTTP/1.1", 200, b"OK", json_headers, b'{"done":true}', "length"),
        Answer(
            b"POST",
            b"HTTP/1.1",
            200,
            b"OK",
            [(b"Content-Type", b"application/x-ndjson")],
            b'{"a":1}\n{"a":2}\n',
            "chunked",
            chunks=[8, 8],
            extension=True,
            trailer=True,
        ),
        Answer(b"POST", b"HTTP/1.1", 200, b"OK", [], b"", "length", interim=[100, 103]),
        Answer(b"HEAD", b"HTTP/1.1", 200, b"OK", [], b"0123456789", "length"),
        Answer(b"GET", b"HTTP/1.1", 204, b"No Content", [], b"", "empty"),
        Answer(b"POST", b"HTTP/1.1", 404, b"Not Found", json_headers, b'{"error":"x"}', "length"),
        Answer(b"POST", b"HTTP/1.1", 200, b"OK", [(b"X-A", b"b")], b"until the end", "close"),
        Answer(b"POST", b"HTTP/1.0", 200, b"OK", [], b"old", "length"),
        Answer(b"POST", b"HTTP/1.1", 200, b"OK", [], b"bye", "chunked", chunks=[3], close=True),
    ]


@pytest.mark.parametrize("settle_first", [True, False])
def test_a_conversation_split_at_every_byte(settle_first: bool) -> None:
    """Every answer of a conversation cut in two at each of its bytes in turn."""
    answers = _fixed_conversation()
    longest = max(len(a.wire_bytes()) for a in answers)
    for position in range(longest + 1):
        talk = Conversation()
        for answer in answers:
            talk.exchange(answer, [position], 1, settle_first)
    talk = Conversation()
    for answer in answers:
        talk.exchange(answer, EVERY_BYTE, 0, settle_first)


@pytest.mark.parametrize(
    "answer",
    [
        # A chunk size is hexadecimal digits: Python's int() also takes
        # these, which would move the answer's end.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\nab\r\n0\r\n\r\n",
    ],
)
def test_a_chunk_size_that_is_not_hexadecimal_fails_the_body(answer: bytes) -> None:
    talk = Conversation()
    requested = talk.agent.request(b"GET", ORIGIN + b"/api/tags")
    (wire,) = talk.endpoints.wires
    wire.protocol.dataReceived(answer)
    body = Body()
    requested.addCallback(lambda response: response.deliverBody(body))
    talk.settle()
    assert body.reason is not None and body.reason.check(ResponseFailed)
    assert wire.closed_by_client


@pytest.mark.parametrize("status", [b"+20", b"-20", b" 20"])
def test_a_status_code_that_is_not_three_digits_fails_the_answer(status: bytes) -> None:
    talk = Conversation()
    requested = talk.agent.request(b"GET", ORIGIN + b"/api/tags")
    (wire,) = talk.endpoints.wires
    wire.protocol.dataReceived(b"HTTP/1.1 " + status + b" OK\r\nContent-Length: 0\r\n\r\n")
    failures: list[Failure] = []
    requested.addErrback(failures.append)
    talk.settle()
    assert failures and failures[0].check(ResponseNeverReceived)


def test_bytes_after_a_bodiless_answer_close_the_connection() -> None:
    talk = Conversation()
    requested = talk.agent.request(b"GET", ORIGIN + b"/api/tags")
    (wire,) = talk.endpoints.wires
    body = Body()
    requested.addCallback(lambda response: response.deliverBody(body))
    wire.protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert body.reason is not None
    assert wire.closed_by_client


def test_a_body_can_pause_and_resume_the_connection() -> None:
    talk = Conversation()
    requested = talk.agent.request(b"GET", ORIGIN + b"/api/tags")
    (wire,) = talk.endpoints.wires
    wire.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    body = Body()
    requested.addCallback(lambda response: response.deliverBody(body))
    assert body.transport is not None
    body.transport.pauseProducing()  # type: ignore[attr-defined]
    assert wire.paused
    body.transport.resumeProducing()  # type: ignore[attr-defined]
    assert not wire.paused
    wire.protocol.dataReceived(b"cd")
    assert body.data == b"abcd" and body.reason is not None and body.reason.check(ResponseDone)


def test_an_idle_connection_that_receives_bytes_is_not_chosen_again() -> None:
    """
    The connection is closed at once, but the protocol hears of it on the
    reactor's next turn; a request sent meanwhile must not go out on it.
    """
    talk = Conversation()
    requested = talk.agent.request(b"GET", ORIGIN + b"/api/tags")
    (first,) = talk.endpoints.wires
    body = Body()
    requested.addCallback(lambda response: response.deliverBody(body))
    first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert body.reason is not None and body.reason.check(ResponseDone)
    first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")  # nobody asked
    talk.agent.request(b"GET", ORIGIN + b"/api/tags")
    assert first.closed_by_client and len(talk.endpoints.wires) == 2
