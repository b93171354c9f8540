"""
The local CA and the certificate directory's files: made once, private
keys ``0600``, certificates for names and addresses that clients accept.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import task

from oproxy.certs.files import (
    held_certificates,
    parse_pem,
    read_directory,
    read_held,
    write_atomically,
)
from oproxy.certs.local import (
    CA_LIFETIME,
    LEAF_LIFETIME,
    LocalCA,
    LocalJob,
    ca_directory,
)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


NOW = datetime.datetime(2026, 5, 1, tzinfo=datetime.UTC)


def test_the_ca_is_made_once_with_a_private_key(tmp_path: Path) -> None:
    ca = LocalCA(ca_directory(str(tmp_path)))
    assert not ca.exists()
    first = ca.load_or_create(NOW)
    assert ca.exists()
    assert mode(ca.key_path) == 0o600
    assert mode(ca.certificate_path) == 0o644
    again = ca.load_or_create(NOW + datetime.timedelta(days=1))
    assert again.certificate == first.certificate
    certificate = first.certificate
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime >= CA_LIFETIME


def test_a_certificate_for_names_and_addresses(tmp_path: Path) -> None:
    ca = LocalCA(ca_directory(str(tmp_path)))
    certs = tmp_path / "certs"
    held = ca.issue(["oproxy.lan", "192.168.1.20", "localhost", "::1"], str(certs), NOW)
    assert held.path == str(certs / "oproxy.lan.pem")
    assert mode(held.path) == 0o600
    assert mode(certs) == 0o700
    certificate = held.certificate
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["oproxy.lan", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.1.20"),
        ipaddress.ip_address("::1"),
    ]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert LEAF_LIFETIME <= lifetime <= LEAF_LIFETIME + datetime.timedelta(hours=1)
    authority = ca.load()
    assert authority is not None and authority.issued(certificate)
    assert held.issuer.startswith("oproxy local CA")


def test_the_job_keeps_only_a_certificate_for_exactly_its_names_from_its_ca(
    tmp_path: Path,
) -> None:
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    certs = str(tmp_path / "certs")
    job = LocalJob(["oproxy.lan", "10.0.0.5"], str(tmp_path), certs, clock)
    assert job.current() is None
    made = job.obtain(threading.Event())
    assert job.current() == made
    assert made.not_before == pytest.approx(NOW.timestamp() - 300)
    # Other names asked for: a new certificate is due.
    other = LocalJob(["oproxy.lan", "10.0.0.6"], str(tmp_path), certs, clock)
    assert other.current() is None
    # A CA made anew (its files deleted): the old certificate is not its own.
    os.unlink(job.ca.key_path)
    os.unlink(job.ca.certificate_path)
    job.ca.load_or_create(NOW)
    assert job.current() is None


def test_files_are_replaced_atomically_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600
    assert os.listdir(tmp_path) == ["x.pem"]  # no temporary file left behind


def test_a_key_and_its_certificate_may_be_in_separate_files(tmp_path: Path) -> None:
    # Twisted's tls: directory allows it; so does ours.
    ca = LocalCA(ca_directory(str(tmp_path)))
    held = ca.issue(["a.test"], str(tmp_path / "one"), NOW)
    data = Path(held.path).read_bytes()
    split = data.index(b"-----BEGIN CERTIFICATE-----")
    certs = tmp_path / "split"
    certs.mkdir()
    (certs / "a-key.pem").write_bytes(data[:split])
    (certs / "a-cert.pem").write_bytes(data[split:])
    (certs / "ca.pem").write_bytes(Path(ca.certificate_path).read_bytes())
    (certs / "notes.txt").write_text("not a pem file")
    (certs / "broken.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"
    )
    found, problems = read_directory(str(certs))
    assert [each.names for each in found] == [("a.test",)]
    # The CA certificate (no key) is the chain.
    assert len(found[0].chain) == 2
    assert len(problems) == 1 and "broken.pem" in problems[0]


def test_a_file_without_a_matching_key_holds_no_certificate(tmp_path: Path) -> None:
    ca = LocalCA(ca_directory(str(tmp_path)))
    first = Path(ca.issue(["a.test"], str(tmp_path / "c"), NOW).path).read_bytes()
    second = Path(ca.issue(["a.test"], str(tmp_path / "d"), NOW).path).read_bytes()
    key_of_first = first[: first.index(b"-----BEGIN CERTIFICATE-----")]
    cert_of_second = second[second.index(b"-----BEGIN CERTIFICATE-----") :]
    mismatched = tmp_path / "mismatched.pem"
    mismatched.write_bytes(key_of_first + cert_of_second)
    assert read_held(str(mismatched)) is None
    assert held_certificates({"x": parse_pem(key_of_first + cert_of_second)}) == []
