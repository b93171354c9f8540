"""
TLS on every listener: version 1.2 or later, modern ciphers, and the
``tls:`` listener's certificates read from their directory as they change.

Twisted parses ``ssl:`` and ``tls:`` endpoint strings; :func:`server_endpoint`
takes what it parses and holds it to one policy (:func:`modern`): TLS 1.2
at least (1.3 when the client has it), forward-secret AEAD ciphers only
for 1.2, no compression, no renegotiation.

Twisted's own ``tls:`` endpoint loads its directory once and re-reads it
only when a client asks for a name it does not know: a certificate renewed
for a name already served would never be picked up without a restart.
Here the directory is checked as connections come (its own ``stat``, which
a rename into it changes, on every connection; each file's at most once a
second, for files rewritten in place), and a file that changed is read
again, in every process that serves it.  The certificate for a connection
is chosen when its handshake starts: by the name the client asks for
(SNI), else by the address it connected to (a client of
``https://192.168.1.20/`` sends no name), else the first certificate.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from oproxy.certs.files import (
    CertificateFileError,
    Held,
    PEMContents,
    held_certificates,
    is_address,
    iso,
    parse_pem,
    pem_files,
)

log = Logger()

#: TLS 1.2's suites: ECDHE key exchange (forward secrecy) and AEAD ciphers
#: only, as Mozilla's "intermediate" profile has them.  TLS 1.3's suites
#: are all of that kind, and OpenSSL's defaults for them stand.
MODERN_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: Seconds between checks of each file in a certificate directory.
FILE_CHECK_INTERVAL = 1.0


def modern(context: SSL.Context) -> SSL.Context:
    """Hold ``context`` to the policy: TLS 1.2+, modern ciphers."""
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(MODERN_CIPHERS)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    return context


def context_for(held: Held) -> SSL.Context:
    """A server context serving one certificate, its chain and its key."""
    context = modern(SSL.Context(SSL.TLS_METHOD))
    context.use_certificate(held.certificate)
    for certificate in held.chain[1:]:
        context.add_extra_chain_cert(certificate)
    context.use_privatekey(held.key)
    context.check_privatekey()
    # Sessions may be resumed on any of the directory's contexts.
    context.set_session_id(b"oproxy")
    return context


@implementer(IOpenSSLContextFactory)
class ModernContextFactory:
    """
    An ``ssl:`` endpoint's context factory, held to the policy: whatever
    ``sslmethod`` the endpoint string named, nothing older than TLS 1.2.
    """

    def __init__(self, original: Any) -> None:
        self._original = original
        self._context: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        if self._context is None:
            self._context = modern(self._original.getContext())
        return self._context


class CertificateDirectory:
    """
    The certificates of one directory, as contexts ready to serve, kept
    current with the files.

    Reading happens in the reactor's thread, but only when a file changed:
    a few small local files, once per renewal.  A file that cannot be read
    (being written by something less careful than :mod:`oproxy.certs.files`)
    keeps what it held before.

    :param clock: when the files were last checked.
    """

    def __init__(
        self, path: str, clock: IReactorTime, interval: float = FILE_CHECK_INTERVAL
    ) -> None:
        self.path = path
        self._clock = clock
        self._interval = interval
        self._directory_stamp: tuple[int, int] | None = None
        self._checked_at: float | None = None
        self._stamps: dict[str, tuple[int, int, int]] | None = None
        self._contents: dict[str, PEMContents] = {}
        self._contexts: dict[str, SSL.Context] = {}
        self._by_name: dict[str, SSL.Context] = {}
        self._by_address: dict[str, SSL.Context] = {}
        self._default: SSL.Context | None = None
        #: What is served now, for tests and reports.
        self.held: list[Held] = []
        self._said_empty = False

    def refresh(self) -> None:
        """Read again whatever changed since the last look."""
        now = self._clock.seconds()
        stamp = _stamp(self.path)
        if (
            stamp == self._directory_stamp
            and self._checked_at is not None
            and now - self._checked_at < self._interval
        ):
            return
        self._directory_stamp, self._checked_at = stamp, now
        stamps = {}
        for path in pem_files(self.path):
            with contextlib.suppress(OSError):
                info = os.stat(path)
                stamps[path] = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamps == self._stamps:
            return
        before = self._stamps or {}
        contents = {}
        for path, each in stamps.items():
            if before.get(path) == each and path in self._contents:
                contents[path] = self._contents[path]
                continue
            try:
                with open(path, "rb") as f:
                    contents[path] = parse_pem(f.read(), path)
            except (OSError, CertificateFileError) as e:
                log.warn("Cannot read {path}: {problem}", path=path, problem=str(e))
                if path in self._contents:
                    contents[path] = self._contents[path]
        self._stamps, self._contents = stamps, contents
        self._install(held_certificates(contents))

    def _install(self, held: list[Held]) -> None:
        contexts: dict[str, SSL.Context] = {}
        by_name: dict[str, SSL.Context] = {}
        by_address: dict[str, SSL.Context] = {}
        # The longest-lasting certificate for a name wins: install in that order.
        for each in sorted(held, key=lambda h: h.not_after):
            context = self._contexts.get(each.fingerprint)
            if context is None:
                try:
                    context = context_for(each)
                except SSL.Error as e:
                    log.warn("Cannot serve {path}: {problem}", path=each.path, problem=str(e))
                    continue
                log.info(
                    "Serving the certificate for {names} from {file} "
                    "(issuer {issuer}, serial {serial}, expires {expires})",
                    names=", ".join(each.names),
                    file=os.path.basename(each.path),
                    issuer=each.issuer,
                    serial=f"{each.serial:x}",
                    expires=iso(each.not_after),
                )
            contexts[each.fingerprint] = context
            for name in each.names:
                if is_address(name):
                    by_address[name] = context
                else:
                    by_name[name] = context
        self._contexts, self._by_name, self._by_address = contexts, by_name, by_address
        ordered = sorted(held, key=lambda h: h.path)
        self._default = contexts.get(ordered[0].fingerprint) if ordered else None
        self.held = ordered
        if self._default is None and not self._said_empty:
            log.warn(
                "No certificate in {path} yet: TLS handshakes fail until one is written",
                path=self.path,
            )
        self._said_empty = self._default is None

    def context(self, name: str | None, address: str | None) -> SSL.Context | None:
        """
        The context for a handshake: by the name asked for (exactly, then a
        wildcard one level up), else by the address connected to, else the
        first certificate.
        """
        if name:
            name = name.lower().rstrip(".")
            found = self._by_name.get(name) or self._by_address.get(name)
            if found is None and "." in name:
                found = self._by_name.get("*." + name.split(".", 1)[1])
            if found is not None:
                return found
        if address:
            found = self._by_address.get(address)
            if found is not None:
                return found
        return self._default


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_ino


def _local_address(connection: SSL.Connection) -> str | None:
    """The address the client connected to, as a certificate would name it."""
    protocol = connection.get_app_data()
    transport = getattr(protocol, "transport", None)
    host = getattr(transport.getHost(), "host", None) if transport is not None else None
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


@implementer(IOpenSSLServerConnectionCreator)
class DirectoryConnectionCreator:
    """
    TLS connections whose certificate comes from a :class:`CertificateDirectory`.

    Every connection starts on a context without a certificate; OpenSSL
    asks for the server name as it reads the client's hello (whether or not
    the client sent one), and the connection moves to the certificate's
    context then.
    """

    def __init__(self, directory: CertificateDirectory) -> None:
        self.directory = directory
        self._first = modern(SSL.Context(SSL.TLS_METHOD))
        self._first.set_session_id(b"oproxy")
        self._first.set_tlsext_servername_callback(self._choose)

    def _choose(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        context = self.directory.context(
            name.decode("ascii", "replace") if name else None, _local_address(connection)
        )
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        self.directory.refresh()
        return SSL.Connection(self._first)


@implementer(IStreamServerEndpoint)
class DirectoryTLSEndpoint:
    """
    ``tls:DIRECTORY``: TLS over a TCP endpoint, its certificates from a
    directory.  ``endpoint`` and ``connectionCreator`` are what
    :mod:`oproxy.listeners` looks for to serve it from a worker.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, creator: DirectoryConnectionCreator):
        self.endpoint = endpoint
        self.connectionCreator = creator

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(TLSMemoryBIOFactory(self.connectionCreator, False, factory))


def tls_endpoint_parts(description: str) -> tuple[str, int, int, str] | None:
    """
    ``(directory, port, backlog, interface)`` of a ``tls:`` endpoint string,
    with Twisted's defaults (port 443, every interface); ``None`` for
    anything else.
    """
    args, kwargs = endpoints._parse(description)  # type: ignore[attr-defined]
    if not args or str(args[0]).strip().lower() != "tls" or len(args) < 2:
        return None
    names = ("path", "port", "backlog", "interface")
    given = {**dict(zip(names, args[1:], strict=False)), **kwargs}
    return (
        os.path.abspath(os.path.expanduser(str(given["path"]))),
        int(given.get("port", 443)),
        int(given.get("backlog", 50)),
        str(given.get("interface", "::")),
    )


def server_endpoint(
    reactor: Any,
    description: str,
    directories: Callable[[str], CertificateDirectory] | None = None,
) -> IStreamServerEndpoint:
    """
    The endpoint ``description`` names, with TLS held to the policy and a
    ``tls:`` directory read as it changes.

    :param directories: makes the directory reader for a path (tests).
    """
    parts = tls_endpoint_parts(description)
    if parts is not None:
        path, port, backlog, interface = parts
        directory = (
            directories(path) if directories is not None else CertificateDirectory(path, reactor)
        )
        tcp = endpoints.TCP6ServerEndpoint(reactor, port, backlog, interface)
        return DirectoryTLSEndpoint(tcp, DirectoryConnectionCreator(directory))
    endpoint: IStreamServerEndpoint = endpoints.serverFromString(reactor, description)
    if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        endpoint._sslContextFactory = ModernContextFactory(endpoint._sslContextFactory)
    return endpoint


def https_port(listen: tuple[str, ...]) -> int | None:
    """The port of the first ``tls:`` or ``ssl:`` listener, where redirects point."""
    for description in listen:
        parts = tls_endpoint_parts(description)
        if parts is not None:
            return parts[1]
        args, kwargs = endpoints._parse(description)  # type: ignore[attr-defined]
        if args and str(args[0]).strip().lower() == "ssl":
            port = kwargs.get("port", args[1] if len(args) > 1 else None)
            if port is not None:
                with contextlib.suppress(ValueError):
                    return int(port)
    return None
