"""
A certificate authority of the daemon's own, for names and addresses on a LAN.

The way mkcert does it: a CA made once, its key private to the daemon's
user in the state directory (``<state dir>/ca/oproxy-ca-key.pem``,
``0600``) and its certificate beside it, for people to add to the trust
stores of the machines that call the daemon; then a certificate for the
names and IP addresses the daemon is reached by, signed by that CA, in the
certificate directory the ``tls:`` listener serves.

Lifetimes: ten years for the CA (it is trusted by hand, once); a year for
a certificate (browsers refuse longer ones), renewed with two thirds of
that gone, like any other (:mod:`oproxy.certs.schedule`).
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oproxy.certs.files import (
    PUBLIC_FILE,
    Held,
    certificate_pem,
    held_for,
    keep_certificate,
    make_directory,
    private_key_pem,
    write_atomically,
)

CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=365)
#: Certificates start a little in the past, for clocks a little behind.
BACKDATE = datetime.timedelta(minutes=5)

CA_CERTIFICATE = "oproxy-ca.pem"
CA_KEY = "oproxy-ca-key.pem"
CA_ORGANIZATION = "oproxy local CA"


class LocalCAError(Exception):
    """The CA's files are there but cannot be used."""


def ca_directory(state_directory: str) -> str:
    return os.path.join(state_directory, "ca")


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA's key and certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def issued(self, certificate: x509.Certificate) -> bool:
        """Whether this CA signed ``certificate`` (and not an earlier CA)."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class LocalCA:
    """
    Where the CA lives, and what it makes.

    :ivar directory: ``<state dir>/ca``.
    """

    directory: str

    @property
    def certificate_path(self) -> str:
        return os.path.join(self.directory, CA_CERTIFICATE)

    @property
    def key_path(self) -> str:
        return os.path.join(self.directory, CA_KEY)

    def exists(self) -> bool:
        return os.path.exists(self.certificate_path) and os.path.exists(self.key_path)

    def load(self) -> CertificateAuthority | None:
        """The CA, if it was made; ``None`` if not."""
        if not os.path.exists(self.key_path):
            return None
        try:
            with open(self.key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            with open(self.certificate_path, "rb") as f:
                certificate = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as e:
            raise LocalCAError(f"the local CA in {self.directory} cannot be read: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise LocalCAError(f"{self.key_path} does not hold an EC key")
        return CertificateAuthority(key, certificate)

    def load_or_create(self, now: datetime.datetime) -> CertificateAuthority:
        """The CA, made now if it was not made before (and then never again)."""
        found = self.load()
        if found is not None:
            return found
        make_directory(self.directory, 0o755)  # the certificate is for everyone
        authority = new_authority(now)
        # The key first: a certificate without its key would be a CA nobody can use.
        write_atomically(self.key_path, private_key_pem(authority.key))
        write_atomically(self.certificate_path, certificate_pem(authority.certificate), PUBLIC_FILE)
        return authority

    def issue(self, names: Sequence[str], certificates: str, now: datetime.datetime) -> Held:
        """
        A certificate for ``names`` (host names and IP addresses), written
        into the directory ``certificates``; the CA is made first if need be.
        """
        authority = self.load_or_create(now)
        key, certificate = new_leaf(authority, names, now)
        held = keep_certificate(certificates, names, key, [certificate])
        assert held is not None
        return held

    def current(self, names: Sequence[str], certificates: str) -> Held | None:
        """
        The certificate in the directory for exactly ``names``, signed by
        this CA; ``None`` if there is none (or the CA was made anew since).
        """
        held = held_for(certificates, names)
        if held is None:
            return None
        authority = self.load()
        if authority is None or not authority.issued(held.certificate):
            return None
        return held


def _owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _dated(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> x509.CertificateBuilder:
    """
    A certificate begun as the CA's and the servers' both are: a fresh
    serial, valid from a little before ``now`` for ``lifetime``.
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only; certificates (and their revocation lists) for the CA alone."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def new_authority(now: datetime.datetime) -> CertificateAuthority:
    """A new CA: its own key, valid ten years, allowed to sign server certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own, so two installations' CAs are never mistaken for one.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _owner()),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"{CA_ORGANIZATION} {_owner()} {secrets.token_hex(3)}"
            ),
        ]
    )
    public = key.public_key()
    certificate = (
        _dated(name, name, public, now, CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, certificate)


def subject_alternative_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def new_leaf(
    authority: CertificateAuthority, names: Sequence[str], now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for ``names`` and its new key, valid a year."""
    if not names:
        raise ValueError("a certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_public = authority.certificate.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
        ]
    )
    certificate = (
        _dated(subject, authority.certificate.subject, public, now, LEAF_LIFETIME)
        .add_extension(subject_alternative_names(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )
    return key, certificate


class LocalJob:
    """
    Keeps the certificate for ``names`` from the local CA (the renewal
    service's job; blocking, in a thread).

    :param clock: what "now" is for a new certificate's dates.
    """

    kind = "local"

    def __init__(
        self, names: Sequence[str], state_directory: str, certificates: str, clock: Any
    ) -> None:
        self.names = tuple(names)
        self.ca = LocalCA(ca_directory(state_directory))
        self.certificates = certificates
        self._clock = clock

    def current(self) -> Held | None:
        return self.ca.current(self.names, self.certificates)

    def obtain(self, stopping: threading.Event) -> Held:
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)
        return self.ca.issue(self.names, self.certificates, now)

    def explain(self, error: Exception) -> str:
        return str(error) or type(error).__name__
