"""
Certificates for tests: a CA of the test's own and certificates it signs,
and blocking TLS clients that say what the server showed.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def self_signed(cert_path: Path, key_path: Path, common_name: str) -> None:
    """
    A self-signed certificate for ``localhost`` and ``127.0.0.1``, valid a
    day, written with its key (PKCS #8): a server's own, with no CA behind it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    moment = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - datetime.timedelta(minutes=5))
        .not_valid_after(moment + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
