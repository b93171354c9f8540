"""
The certificate directory: one PEM file per certificate, key and chain.

The layout is the one Twisted's ``tls:`` endpoint reads: ``*.pem`` files in
one directory, each holding private keys and certificates; a certificate
is served for the names in its subject alternative names when a key in the
directory matches it, with the other certificates as its chain.  The
daemon writes ``<first name>.pem`` holding the key, the certificate and its
chain, in that order.

A file is replaced atomically: written to a temporary file beside it (made
``0600`` before a byte of key is written, and not ending in ``.pem``, so no
reader picks it up half-written), flushed to disk, then renamed over the
old one.  A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtensionOID, NameOID

#: A private key's file, and the directories holding them: the owner's only.
PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700
#: A certificate alone (a CA's, for people to trust): anyone may read it.
PUBLIC_FILE = 0o644

PEM_SUFFIX = ".pem"


#: The keys a TLS server can serve a certificate with.
ServerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SERVER_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class CertificateFileError(Exception):
    """A file in the directory cannot be read as certificates and keys."""


def write_atomically(path: str, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """
    Replace ``path`` with ``data`` in one step, readable as ``mode`` says.

    The temporary file is created with ``mode`` (``0600`` by default)
    before anything is written to it, so a key is never readable by others,
    even for a moment.
    """
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (a crash must not bring back the old file)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def make_directory(path: str, mode: int = PRIVATE_DIRECTORY) -> None:
    """``path`` and its parents; a directory made here gets ``mode``."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=mode, exist_ok=True)
        os.chmod(path, mode)


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def file_name_for(names: Sequence[str]) -> str:
    """``<first name>.pem``; a wildcard's ``*`` is spelt ``_``."""
    return names[0].replace("*", "_") + PEM_SUFFIX


def write_certificate(
    directory: str,
    names: Sequence[str],
    key: PrivateKeyTypes,
    chain: Sequence[x509.Certificate],
) -> str:
    """
    Write key, certificate and chain into ``directory`` as one private file.

    :return: the file's path.
    """
    make_directory(directory)
    path = os.path.join(directory, file_name_for(names))
    data = private_key_pem(key) + b"".join(certificate_pem(each) for each in chain)
    write_atomically(path, data, PRIVATE_FILE)
    return path


# -- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PEMContents:
    """What one PEM file holds: private keys and certificates, in file order."""

    keys: tuple[ServerKey, ...]
    certificates: tuple[x509.Certificate, ...]


def parse_pem(data: bytes, where: str = "") -> PEMContents:
    """
    Split a PEM file into its keys and certificates.

    :raises CertificateFileError: a block cannot be read.
    """
    keys: list[ServerKey] = []
    certificates: list[x509.Certificate] = []
    for kind, block in _blocks(data):
        try:
            if kind == b"CERTIFICATE":
                certificates.append(x509.load_pem_x509_certificate(block))
            elif kind.endswith(b"PRIVATE KEY"):
                key = serialization.load_pem_private_key(block, password=None)
                if isinstance(key, _SERVER_KEYS):
                    keys.append(key)
        except (ValueError, TypeError) as e:
            raise CertificateFileError(f"{where}: unreadable {kind.decode()} ({e})") from None
    return PEMContents(tuple(keys), tuple(certificates))


def _blocks(data: bytes) -> Iterable[tuple[bytes, bytes]]:
    start = 0
    while True:
        begin = data.find(b"-----BEGIN ", start)
        if begin < 0:
            return
        label_end = data.find(b"-----", begin + 11)
        kind = data[begin + 11 : label_end]
        end_marker = b"-----END " + kind + b"-----"
        end = data.find(end_marker, label_end)
        if label_end < 0 or end < 0:
            return
        start = end + len(end_marker)
        yield kind, data[begin:start] + b"\n"


def public_key_bytes(public: PublicKeyTypes) -> bytes:
    """A public key's identity, to match a private key with its certificate."""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def names_of(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is for (its SANs)."""
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    except x509.ExtensionNotFound:
        return ()
    sans = extension.value
    assert isinstance(sans, x509.SubjectAlternativeName)
    found = [name.lower() for name in sans.get_values_for_type(x509.DNSName)]
    found += [str(address) for address in sans.get_values_for_type(x509.IPAddress)]
    return tuple(found)


def issuer_of(certificate: x509.Certificate) -> str:
    """The issuer's common name (or its whole name, when it has none)."""
    common = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        return str(common[0].value)
    return certificate.issuer.rfc4514_string()


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate_pem(certificate)).hexdigest()


@dataclass(frozen=True)
class Held:
    """
    One certificate the directory holds with its key: what is served.

    Times are Unix seconds.
    """

    path: str
    names: tuple[str, ...]
    issuer: str
    not_before: float
    not_after: float
    serial: int
    fingerprint: str
    key: ServerKey = field(repr=False, compare=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False, compare=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def serves(self, name: str) -> bool:
        return name in self.names

    def to_json(self, now: float) -> dict[str, object]:
        """As ``oproxy certs status --json`` and ``/v1/health`` show it."""
        left = self.not_after - now
        return {
            "file": os.path.basename(self.path),
            "names": list(self.names),
            "issuer": self.issuer,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "expires_in_seconds": round(left),
            "days_left": round(left / 86400, 1),
            "serial": f"{self.serial:x}",
        }


def iso(moment: float) -> str:
    return (
        datetime.datetime.fromtimestamp(moment, datetime.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


def held_certificates(contents: dict[str, PEMContents]) -> list[Held]:
    """
    Every certificate whose key is in the directory, with its chain.

    ``contents`` maps each file's path to what it holds.  A key matches the
    certificate with the same public key, in any file (Twisted's ``tls:``
    endpoint allows key and certificate in separate files); the chain is
    the certificates without a key, followed from issuer to issuer.
    """
    keys = {public_key_bytes(k.public_key()): k for each in contents.values() for k in each.keys}
    by_subject: dict[bytes, x509.Certificate] = {}
    leaves: list[tuple[str, x509.Certificate, ServerKey]] = []
    for path, each in sorted(contents.items()):
        for certificate in each.certificates:
            key = keys.get(public_key_bytes(certificate.public_key()))
            if key is not None:
                leaves.append((path, certificate, key))
            else:
                by_subject.setdefault(certificate.subject.public_bytes(), certificate)
    found = []
    for path, leaf, key in leaves:
        chain = [leaf]
        issuer = by_subject.get(leaf.issuer.public_bytes())
        while issuer is not None and issuer not in chain and len(chain) < 10:
            chain.append(issuer)
            if issuer.issuer == issuer.subject:
                break
            issuer = by_subject.get(issuer.issuer.public_bytes())
        found.append(
            Held(
                path=path,
                names=names_of(leaf),
                issuer=issuer_of(leaf),
                not_before=leaf.not_valid_before_utc.timestamp(),
                not_after=leaf.not_valid_after_utc.timestamp(),
                serial=leaf.serial_number,
                fingerprint=fingerprint(leaf),
                key=key,
                chain=tuple(chain),
            )
        )
    return found


def pem_files(directory: str) -> list[str]:
    """The ``*.pem`` files directly in ``directory`` (none if it does not exist)."""
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with entries:
        return sorted(
            entry.path
            for entry in entries
            if entry.name.endswith(PEM_SUFFIX)
            and not entry.name.startswith(".")
            and entry.is_file()
        )


def read_directory(directory: str) -> tuple[list[Held], list[str]]:
    """
    The certificates the directory holds, and a line for each file that
    could not be read.
    """
    contents: dict[str, PEMContents] = {}
    problems = []
    for path in pem_files(directory):
        try:
            with open(path, "rb") as f:
                contents[path] = parse_pem(f.read(), path)
        except (OSError, CertificateFileError) as e:
            problems.append(str(e))
    return held_certificates(contents), problems


def read_held(path: str) -> Held | None:
    """The certificate a file holds with its key, or ``None`` if it holds none."""
    try:
        with open(path, "rb") as f:
            contents = parse_pem(f.read(), path)
    except FileNotFoundError:
        return None
    found = held_certificates({path: contents})
    return found[0] if found else None


def held_for(directory: str, names: Sequence[str]) -> Held | None:
    """
    The certificate kept in ``directory`` for exactly ``names``, in any
    order; ``None`` if there is none, or it was made for other names.
    """
    held = read_held(os.path.join(directory, file_name_for(names)))
    if held is None or set(held.names) != set(names):
        return None
    return held


def keep_certificate(
    directory: str,
    names: Sequence[str],
    key: PrivateKeyTypes,
    chain: Sequence[x509.Certificate],
) -> Held | None:
    """
    Write a new certificate for ``names`` and read it back as the listeners
    will: ``None`` if the chain is not the key's.
    """
    return read_held(write_certificate(directory, names, key, chain))


def for_name(held: Iterable[Held], name: str) -> Held | None:
    """The certificate serving ``name``: the one that lasts longest."""
    matching = [each for each in held if each.serves(name)]
    return max(matching, key=lambda each: each.not_after, default=None)


def is_address(name: str) -> bool:
    """Whether ``name`` is an IP address rather than a host name."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
