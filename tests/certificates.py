"""
Certificates for tests: a CA of the test's own and certificates it signs,
and blocking TLS clients that say what the server showed.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from oproxy.certs.files import certificate_pem, write_certificate
from oproxy.certs.local import CertificateAuthority, new_authority, new_leaf


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class TrustedCA:
    authority: CertificateAuthority
    path: Path

    @classmethod
    def make(cls, directory: Path) -> TrustedCA:
        authority = new_authority(now())
        path = directory / "test-ca.pem"
        path.write_bytes(certificate_pem(authority.certificate))
        return cls(authority, path)

    def issue(self, directory: Path, *names: str) -> tuple[Path, x509.Certificate]:
        """A certificate for ``names`` written into ``directory``; its path and itself."""
        key, certificate = new_leaf(self.authority, names, now())
        return Path(write_certificate(str(directory), names, key, [certificate])), certificate

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.path))


def fingerprint(der: bytes) -> str:
    """As :func:`oproxy.certs.files.fingerprint` has it: of the PEM form."""
    return hashlib.sha256(certificate_pem(x509.load_der_x509_certificate(der))).hexdigest()


@dataclass
class Handshake:
    version: str
    cipher: str
    certificate: x509.Certificate

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


def handshake(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None,
    host: str = "127.0.0.1",
) -> Handshake:
    """Connect, shake hands, and say what was agreed and shown (blocking)."""
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        cipher = tls.cipher()
        return Handshake(
            version=tls.version() or "",
            cipher=cipher[0] if cipher else "",
            certificate=x509.load_der_x509_certificate(der),
        )


def unverified(
    *,
    minimum: ssl.TLSVersion = ssl.TLSVersion.MINIMUM_SUPPORTED,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A client that takes any certificate, limited to the versions given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if minimum < ssl.TLSVersion.TLSv1_2 or ciphers:
        # OpenSSL 3 refuses TLS 1.0 and 1.1 at its default security level.
        context.set_ciphers(ciphers or "DEFAULT:@SECLEVEL=0")
    context.minimum_version = minimum
    context.maximum_version = maximum
    return context
