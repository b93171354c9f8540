"""
RESP, the Redis protocol: a small, typed client for Twisted, RESP2 over one
persistent connection, in the clear or over TLS (``rediss://``).

Why not a library: the Twisted Redis clients are unmaintained or untyped, and
what the proxy needs is small: plain commands (``GET``, ``SET``, ``INCR``)
and Lua scripts (``EVALSHA``, ``SCRIPT LOAD``), pipelined on one connection
per process.  Pub/sub, ``MONITOR`` and RESP3 pushes are deliberately not
supported: every reply here answers exactly one command, in order.

Failure behaviour is what a cache or a rate limiter in the request path
needs: a command never waits on a dead server.  A command on a broken
connection fails at once with :class:`RedisConnectionError`; the next one
reconnects.  A server that stops answering is detected by a command timeout,
which drops the connection.  After a failed connection attempt, commands
fail fast for ``retry_delay`` seconds instead of each paying the connect
timeout again.

Over TLS the server's certificate is verified by default, against the
system's trust store or a CA file, and its name must match the URL's host;
the URL's query says otherwise with the parameters redis-py reads
(``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from OpenSSL import SSL
from twisted.internet import defer, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

DEFAULT_PORT = 6379

Arg = bytes | str | int


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisReplyError(RedisError):
    """
    The server answered a command with an error reply (``-ERR ...``).

    :ivar code: the error's first word (``ERR``, ``WRONGTYPE``, ``NOSCRIPT``,
        ``NOAUTH`` ...), which is what callers branch on.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


class RedisConnectionError(RedisError):
    """No connection, a lost connection, or a server that stopped answering."""


class RedisProtocolError(RedisConnectionError):
    """The server sent bytes that are not RESP2; the connection is dropped."""


# -- RESP2 ---------------------------------------------------------------


def encode_command(args: tuple[Arg, ...]) -> bytes:
    """
    One command as a RESP2 array of bulk strings.

    Integers are sent as their decimal text, strings as UTF-8.  Booleans are
    refused: ``True`` would otherwise go out as the text ``"True"``.
    """
    if not args:
        raise ValueError("a Redis command needs at least a name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise TypeError(f"Redis arguments are bytes, str or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


_MAX_BULK = 512 * 1024 * 1024  # Redis's own proto-max-bulk-len default


def parse_reply(buffer: bytes | bytearray, start: int) -> tuple[Any, int] | None:
    """
    Parse one reply at ``start``: ``(value, end)``, or ``None`` if incomplete.

    Simple strings become ``str``, bulk strings ``bytes``, integers ``int``,
    arrays ``list``, nil replies ``None``.  An error reply becomes a
    :class:`RedisReplyError` *value* (raised by the caller at top level, kept
    as an element inside arrays, as ``EXEC`` results need).

    :raises RedisProtocolError: the bytes are not RESP2.
    """
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        if len(buffer) - start > 64 * 1024:
            raise RedisProtocolError("reply header line is too long")
        return None
    kind = buffer[start : start + 1]
    line = bytes(buffer[start + 1 : line_end])
    after = line_end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RedisReplyError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return _integer(line), after
    if kind == b"$":
        length = _integer(line)
        if length == -1:
            return None, after
        if length < 0 or length > _MAX_BULK:
            raise RedisProtocolError(f"bad bulk string length {length}")
        end = after + length
        if len(buffer) < end + 2:
            return None
        if buffer[end : end + 2] != b"\r\n":
            raise RedisProtocolError("bulk string is not followed by CRLF")
        return bytes(buffer[after:end]), end + 2
    if kind == b"*":
        count = _integer(line)
        if count == -1:
            return None, after
        if count < 0:
            raise RedisProtocolError(f"bad array length {count}")
        items: list[Any] = []
        position = after
        for _ in range(count):
            parsed = parse_reply(buffer, position)
            if parsed is None:
                return None
            item, position = parsed
            items.append(item)
        return items, position
    raise RedisProtocolError(f"unknown reply type {kind!r}")


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RedisProtocolError(f"bad integer {line[:32]!r}") from None


# -- the connection --------------------------------------------------------


def _fire(waiting: defer.Deferred[Any], outcome: object) -> None:
    """
    Answer a waiting caller with ``outcome``: a :class:`RedisError` fails
    it, anything else is its result.  A caller that was cancelled has had
    its answer already (``CancelledError``) and is left alone.
    """
    if waiting.called:
        return
    if isinstance(outcome, RedisError):
        waiting.errback(outcome)
    else:
        waiting.callback(outcome)


@implementer(IHandshakeListener)
class RedisProtocol(Protocol):
    """
    One connection: commands go out as they come, replies answer a FIFO.

    :param command_timeout: seconds the oldest outstanding command may wait
        for its reply before the connection is declared dead and dropped;
        ``None`` waits forever.
    """

    def __init__(self, clock: IReactorTime, command_timeout: float | None) -> None:
        self._clock = clock
        self._command_timeout = command_timeout
        self._buffer = bytearray()
        self._pending: deque[defer.Deferred[Any]] = deque()
        self._watchdog: IDelayedCall | None = None
        self._open = False
        self._why_closing: RedisConnectionError | None = None
        self._lost_waiters: list[defer.Deferred[None]] = []
        self._has_been_lost = False
        self._garbled = False
        self._secured = False
        self._secured_waiters: list[defer.Deferred[None]] = []

    @property
    def usable(self) -> bool:
        """Whether a command sent now has a chance of an answer."""
        return self._open and self._why_closing is None

    def connectionMade(self) -> None:
        self._open = True
        if ITCPTransport.providedBy(self.transport):
            # Small pipelined commands must not sit in Nagle's buffer.
            self.transport.setTcpNoDelay(True)

    def handshakeCompleted(self) -> None:
        """Over TLS: the server's certificate was accepted."""
        self._secured = True
        waiters, self._secured_waiters = self._secured_waiters, []
        for waiter in waiters:
            if not waiter.called:  # its caller was cancelled
                waiter.callback(None)

    def when_secured(self) -> defer.Deferred[None]:
        """
        A fresh Deferred that fires when the TLS handshake is done, or fails
        with the reason the connection was lost before.
        """
        if self._secured:
            return defer.succeed(None)
        if self._has_been_lost:
            return defer.fail(self._why_closing or RedisConnectionError("not connected to Redis"))
        waiter: defer.Deferred[None] = defer.Deferred()
        self._secured_waiters.append(waiter)
        return waiter

    def send(self, args: tuple[Arg, ...]) -> defer.Deferred[Any]:
        """
        Send one command; the Deferred fires with its reply.

        Cancelling the Deferred only stops waiting: the reply, when it
        comes, is read and dropped so the FIFO stays in step.
        """
        if not self.usable:
            return defer.fail(self._why_closing or RedisConnectionError("not connected to Redis"))
        data = encode_command(args)
        waiting: defer.Deferred[Any] = defer.Deferred()
        self._pending.append(waiting)
        assert self.transport is not None
        self.transport.write(data)
        if self._watchdog is None and self._command_timeout is not None:
            self._watchdog = self._clock.callLater(self._command_timeout, self._timed_out)
        return waiting

    def dataReceived(self, data: bytes) -> None:
        if self._garbled:
            return
        self._buffer += data
        position = 0
        try:
            while position < len(self._buffer):
                parsed = parse_reply(self._buffer, position)
                if parsed is None:
                    break
                value, position = parsed
                self._answer(value)
        except RedisProtocolError as e:
            # Nothing after this point can be matched to a command.
            self._garbled = True
            self._buffer.clear()
            self._drop(e)
            return
        if position:
            del self._buffer[:position]

    def _answer(self, value: Any) -> None:
        if not self._pending:
            raise RedisProtocolError("reply with no command waiting for it")
        waiting = self._pending.popleft()
        if self._watchdog is not None:
            if self._pending and self._command_timeout is not None:
                self._watchdog.reset(self._command_timeout)
            else:
                self._watchdog.cancel()
                self._watchdog = None
        _fire(waiting, value)

    def _timed_out(self) -> None:
        self._watchdog = None
        self._drop(
            RedisConnectionError(f"Redis did not answer within {self._command_timeout} seconds")
        )

    def drop(self, why: RedisConnectionError) -> None:
        """Abort the connection; whatever waits on it fails with ``why``."""
        self._drop(why)

    def _drop(self, why: RedisConnectionError) -> None:
        if self._why_closing is None:
            self._why_closing = why
        if self.transport is not None:
            # Every stream transport has it; only ITransport is declared.
            cast(ITCPTransport, self.transport).abortConnection()

    def close(self) -> defer.Deferred[None]:
        """Close the connection; fires once it is closed."""
        lost = self.when_lost()
        if self._why_closing is None:
            self._why_closing = RedisConnectionError("the Redis connection was closed")
        if self.transport is not None and self._open:
            self.transport.loseConnection()
        return lost

    def when_lost(self) -> defer.Deferred[None]:
        """A fresh Deferred that fires when this connection is gone."""
        if self._has_been_lost:
            return defer.succeed(None)
        lost: defer.Deferred[None] = defer.Deferred()
        self._lost_waiters.append(lost)
        return lost

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._open = False
        self._has_been_lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        why = self._why_closing or RedisConnectionError(
            f"lost the connection to Redis: {reason.getErrorMessage()}"
        )
        self._why_closing = why
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            if not waiting.called:
                waiting.errback(why)
        if not self._secured:
            secured, self._secured_waiters = self._secured_waiters, []
            for waiter in secured:
                if not waiter.called:
                    waiter.errback(why)
        waiters, self._lost_waiters = self._lost_waiters, []
        for lost in waiters:
            lost.callback(None)


# -- the client ------------------------------------------------------------


class _OneConnection(ClientFactory):
    """Hands out one protocol, without a log line for every (re)connection."""

    noisy = False

    def __init__(self, protocol: RedisProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> RedisProtocol:
        return self._protocol


#: The URL's TLS parameters, named as redis-py names them.
TLS_PARAMETERS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class TLSSettings:
    """
    How to speak TLS to Redis (``rediss://``), from the URL's query.

    :ivar verify: whether the server's certificate must be valid for the
        URL's host (``ssl_cert_reqs=required``, the default; ``none`` turns
        it off, for a test server with a self-made certificate).
    :ivar ca_file: PEM certificates to trust instead of the system's
        (``ssl_ca_certs``), for a private CA.
    :ivar cert_file: a client certificate (``ssl_certfile``), for a server
        that asks for one (``tls-auth-clients yes``).
    :ivar key_file: its private key (``ssl_keyfile``); without it the key is
        read from ``cert_file``.
    """

    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_query(cls, query: dict[str, list[str]], url: str) -> TLSSettings:
        unknown = sorted(k for k in query if k.startswith("ssl_") and k not in TLS_PARAMETERS)
        if unknown:
            raise ValueError(
                f"unknown TLS parameter {unknown[0]!r} in Redis URL {redact(url)!r} "
                f"(known: {', '.join(TLS_PARAMETERS)})"
            )
        given = {k: query[k][-1] for k in TLS_PARAMETERS if k in query}
        requirement = given.get("ssl_cert_reqs", "required").lower()
        if requirement not in ("required", "optional", "none"):
            raise ValueError(
                f"ssl_cert_reqs must be required or none, not {requirement!r}, "
                f"in Redis URL {redact(url)!r}"
            )
        settings = cls(
            # A client that accepts an optional certificate still checks the
            # one it gets, as Python's ssl module does.
            verify=requirement != "none",
            ca_file=given.get("ssl_ca_certs"),
            cert_file=given.get("ssl_certfile"),
            key_file=given.get("ssl_keyfile"),
        )
        if not settings.verify and settings.ca_file:
            raise ValueError(
                f"ssl_ca_certs has no use with ssl_cert_reqs=none in Redis URL {redact(url)!r}"
            )
        if settings.key_file and not settings.cert_file:
            raise ValueError(f"ssl_keyfile needs ssl_certfile in Redis URL {redact(url)!r}")
        return settings


@dataclass(frozen=True)
class RedisAddress:
    """
    Where and how to connect, parsed from a URL.

    ``redis://[[user]:password@]host[:port][/db]``, the same with
    ``rediss://`` for TLS (and the ``ssl_*`` parameters of
    :class:`TLSSettings`), or ``unix://[[user]:password@]/path/to/socket[?db=N]``;
    ``?password=`` is accepted as well.
    """

    host: str | None
    port: int
    path: str | None
    db: int
    username: str | None
    password: str | None
    tls: TLSSettings | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if "password" in query:
            password = query["password"][-1]
        db_text = query["db"][-1] if "db" in query else ""
        tls = None
        if parts.scheme == "rediss":
            tls = TLSSettings.from_query(query, url)
        elif any(k.startswith("ssl_") for k in query):
            raise ValueError(f"ssl_* parameters need a rediss:// URL: {redact(url)!r}")
        if parts.scheme in ("redis", "rediss"):
            if not db_text:
                db_text = parts.path.strip("/")
            try:
                port = parts.port or DEFAULT_PORT
            except ValueError:
                raise ValueError(f"bad port in Redis URL {redact(url)!r}") from None
            host, path = parts.hostname or "127.0.0.1", None
        elif parts.scheme == "unix":
            if not parts.path:
                raise ValueError(f"a unix:// Redis URL needs a socket path: {redact(url)!r}")
            host, port, path = None, DEFAULT_PORT, parts.path
        else:
            raise ValueError(f"not a redis://, rediss:// or unix:// URL: {redact(url)!r}")
        try:
            db = int(db_text) if db_text else 0
        except ValueError:
            raise ValueError(f"bad database number in Redis URL {redact(url)!r}") from None
        if db < 0:
            raise ValueError(f"bad database number in Redis URL {redact(url)!r}")
        return cls(
            host=host, port=port, path=path, db=db, username=username, password=password, tls=tls
        )

    def handshake(self) -> list[tuple[Arg, ...]]:
        """The commands that prepare a new connection: ``AUTH``, ``SELECT``."""
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            if self.username:
                commands.append((b"AUTH", self.username, self.password))
            else:
                commands.append((b"AUTH", self.password))
        if self.db:
            commands.append((b"SELECT", self.db))
        return commands

    def __str__(self) -> str:
        """For logs and errors: never the password."""
        if self.path is not None:
            return f"unix:{self.path} db {self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port} db {self.db}" + (" over TLS" if self.tls else "")


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None and "password=" not in parts.query:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    query = "&".join(
        "password=***" if item.startswith("password=") else item for item in parts.query.split("&")
    )
    return parts._replace(netloc=f"{user}:***@{netloc}", query=query).geturl()


class RedisClient:
    """
    Commands over one persistent, lazily (re)opened connection.

    :param reactor: provides ``IReactorTime`` and ``IReactorTCP`` /
        ``IReactorUNIX`` as the URL needs.
    :param url: ``redis://[[user]:password@]host[:port][/db]``, the same
        with ``rediss://`` for TLS, or ``unix://[[user]:password@]/path?db=N``.
    :param connect_timeout: seconds to wait for a connection.
    :param command_timeout: seconds the oldest outstanding reply may be late
        before the connection is dropped (``None``: forever).
    :param retry_delay: after a failed connection attempt, seconds during
        which commands fail fast instead of trying again.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        connect_timeout: float = 2.0,
        command_timeout: float | None = 2.0,
        retry_delay: float = 1.0,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.address = RedisAddress.from_url(url)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._retry_delay = retry_delay
        self._protocol: RedisProtocol | None = None
        self._connecting: defer.Deferred[None] | None = None
        self._waiters: list[defer.Deferred[RedisProtocol]] = []
        self._retry_at = 0.0
        self._last_error: RedisError | None = None
        self._closed = False
        self._tls: IOpenSSLClientConnectionCreator | None = None

    async def execute(self, *args: Arg) -> Any:
        """
        Run one command and return its reply.

        Concurrent calls are pipelined on the one connection.

        :raises RedisReplyError: the server answered with an error.
        :raises RedisConnectionError: no answer could be had.
        """
        if not args:
            raise ValueError("a Redis command needs at least a name")
        protocol = self._protocol
        if protocol is None or not protocol.usable:
            protocol = await self._connection()
        return await protocol.send(args)

    def close(self) -> defer.Deferred[None]:
        """
        Close the connection for good; later commands fail.

        Returns a Deferred, so it can be a ``before shutdown`` trigger.
        """
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()  # its waiters hear "closed" from _connected
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return defer.succeed(None)
        return protocol.close()

    async def _connection(self) -> RedisProtocol:
        if self._closed:
            raise RedisConnectionError("the Redis client was closed")
        failed_lately = self._last_error is not None and self._clock.seconds() < self._retry_at
        if self._connecting is None and failed_lately:
            raise RedisConnectionError(
                f"not connected to Redis at {self.address}: {self._last_error}"
            )
        # Each caller waits on its own Deferred: a Deferred awaited by several
        # coroutines hands its result to the first only, and cancelling one
        # caller must not cancel the connection attempt the others share.
        waiter: defer.Deferred[RedisProtocol] = defer.Deferred()
        self._waiters.append(waiter)
        if self._connecting is None:
            attempt = defer.Deferred.fromCoroutine(self._connect())
            # An attempt can end before it waits on anything (a TLS file
            # that cannot be read): it has told the waiters already.
            if not attempt.called:
                self._connecting = attempt
        return await waiter

    async def _connect(self) -> None:
        try:
            protocol = await self._open()
        except defer.CancelledError:
            self._connected(RedisConnectionError("the connection attempt was cancelled"))
            return
        except RedisError as e:
            self._connected(e)
            return
        except Exception as e:
            self._connected(RedisConnectionError(f"cannot connect to Redis at {self.address}: {e}"))
            return
        self._connected(protocol)

    async def _open(self) -> RedisProtocol:
        address = self.address
        endpoint: Any
        if address.path is not None:
            endpoint = UNIXClientEndpoint(
                self._reactor, address.path, timeout=self._connect_timeout
            )
        elif address.host is not None and isIPAddress(address.host):
            endpoint = TCP4ClientEndpoint(
                self._reactor, address.host, address.port, timeout=self._connect_timeout
            )
        elif address.host is not None and isIPv6Address(address.host):
            endpoint = TCP6ClientEndpoint(
                self._reactor, address.host, address.port, timeout=self._connect_timeout
            )
        else:
            # Names go through happy eyeballs; literals above skip its delays.
            assert address.host is not None
            endpoint = HostnameEndpoint(
                self._reactor, address.host, address.port, timeout=self._connect_timeout
            )
        if address.tls is not None:
            if self._tls is None:
                # Read once, at the first connection: the files are small.
                self._tls = client_tls(address)
            endpoint = wrapClientTLS(self._tls, endpoint)
        protocol = RedisProtocol(self._clock, self._command_timeout)
        await endpoint.connect(_OneConnection(protocol))
        try:
            if address.tls is not None:
                await self._secure(protocol)
            for command in address.handshake():
                await protocol.send(command)
        except BaseException:
            protocol.close()
            raise
        protocol.when_lost().addCallback(lambda _: self._lost(protocol))
        return protocol

    async def _secure(self, protocol: RedisProtocol) -> None:
        """Wait for the TLS handshake, as long as a connection may take."""
        timer = self._clock.callLater(
            self._connect_timeout,
            protocol.drop,
            RedisConnectionError(f"no TLS handshake within {self._connect_timeout:g} seconds"),
        )
        try:
            await protocol.when_secured()
        except RedisConnectionError as e:
            raise RedisConnectionError(
                f"no TLS connection to Redis at {self.address}: {e}"
            ) from None
        finally:
            if timer.active():
                timer.cancel()

    def _connected(self, outcome: RedisProtocol | RedisError) -> None:
        self._connecting = None
        if self._closed:
            if isinstance(outcome, RedisProtocol):
                outcome.close()
            outcome = RedisConnectionError("the Redis client was closed")
        elif isinstance(outcome, RedisProtocol):
            self._protocol = outcome
            self._last_error = None
        if isinstance(outcome, RedisError):
            self._last_error = outcome
            self._retry_at = self._clock.seconds() + self._retry_delay
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _fire(waiter, outcome)

    def _lost(self, protocol: RedisProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None


# -- TLS -----------------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def client_tls(address: RedisAddress) -> IOpenSSLClientConnectionCreator:
    """
    The TLS side of connections to ``address``: the server's certificate
    checked against the trust roots and the host name, unless the URL says
    ``ssl_cert_reqs=none``; the client certificate, if the URL names one.

    :raises RedisConnectionError: a file cannot be read or is not PEM.
    """
    settings = address.tls
    assert settings is not None and address.host is not None
    try:
        client = None
        if settings.cert_file:
            pem = Path(settings.cert_file).read_bytes()
            if settings.key_file:
                pem += b"\n" + Path(settings.key_file).read_bytes()
            client = ssl.PrivateCertificate.loadPEM(pem)
        if not settings.verify:
            options = client.options() if client is not None else ssl.CertificateOptions()
            return _Unverified(address.host, options.getContext())
        trust: Any = None  # the system's trust store
        if settings.ca_file:
            found = _PEM_CERTIFICATE.findall(Path(settings.ca_file).read_bytes())
            if not found:
                raise ValueError(f"no PEM certificate in {settings.ca_file}")
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(c) for c in found])
        return ssl.optionsForClientTLS(address.host, trustRoot=trust, clientCertificate=client)
    except (OSError, ValueError, SSL.Error) as e:
        raise RedisConnectionError(f"cannot set up TLS for Redis at {address}: {e}") from None


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    TLS that takes any certificate (``ssl_cert_reqs=none``), but still names
    the host it wants (SNI), as services that route by name need.
    """

    def __init__(self, host: str, context: SSL.Context) -> None:
        self._context = context
        self._server_name = (
            None if isIPAddress(host) or isIPv6Address(host) else host.encode("idna")
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection
