"""
TLS on the listeners: 1.2 and later only, modern ciphers, and the ``tls:``
directory's certificates chosen by name or address and re-read when they
change, without a restart.  Real listeners on loopback, real clients
(Python's ``ssl``) in a thread.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from oproxy.certs.files import certificate_pem, private_key_pem, write_atomically
from oproxy.certs.local import new_leaf
from oproxy.certs.tls import (
    CertificateDirectory,
    DirectoryTLSEndpoint,
    https_port,
    server_endpoint,
    tls_endpoint_parts,
)
from tests.certificates import TrustedCA, handshake, now, unverified


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


@pytest.fixture
def ca(tmp_path: Path) -> TrustedCA:
    return TrustedCA.make(tmp_path)


def listen_on(description: str) -> Any:
    """Listen now: a TCP endpoint binds at once, its Deferred already fired."""
    results: list[Any] = []
    server_endpoint(reactor, description).listen(Site(Hello())).addBoth(results.append)
    return results[0]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    directory.mkdir()
    return directory


@pytest.fixture
def tls_port(certs: Path, ca: TrustedCA) -> Iterator[int]:
    ca.issue(certs, "gw.example.test", "127.0.0.1")
    port = listen_on(f"tls:{certs}:port=0:interface=127.0.0.1")
    yield port.getHost().port
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def ssl_port(tmp_path: Path, ca: TrustedCA) -> Iterator[int]:
    key, certificate = new_leaf(ca.authority, ["gw.example.test"], now())
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    write_atomically(str(key_path), private_key_pem(key))
    cert_path.write_bytes(certificate_pem(certificate))
    port = listen_on(f"ssl:0:privateKey={key_path}:certKey={cert_path}:interface=127.0.0.1")
    yield port.getHost().port
    pytest_twisted.blockon(port.stopListening())


async def in_thread(f: Any, *args: Any) -> Any:
    return await threads.deferToThread(f, *args)


async def refused(port: int, context: ssl.SSLContext) -> bool:
    try:
        await in_thread(handshake, port, context, "gw.example.test")
    except (ssl.SSLError, ConnectionResetError):
        return True
    return False


@pytest.fixture
def permissive_port(tmp_path: Path, ca: TrustedCA) -> Iterator[int]:
    """
    A server that does take TLS 1.1: the control that shows the client
    below can speak it, so a refusal comes from the server under test.
    """
    key, certificate = new_leaf(ca.authority, ["gw.example.test"], now())
    pem = tmp_path / "permissive.pem"
    pem.write_bytes(private_key_pem(key) + certificate_pem(certificate))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pem))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1_1
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with context.wrap_socket(connection, server_side=True):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(5)
    listener.close()


TLS_1_1 = {"minimum": ssl.TLSVersion.TLSv1, "maximum": ssl.TLSVersion.TLSv1_1}


@pytest_twisted.ensureDeferred
async def test_the_old_client_used_below_does_speak_tls_1_1(permissive_port: int) -> None:
    agreed = await in_thread(handshake, permissive_port, unverified(**TLS_1_1), None)
    assert agreed.version == "TLSv1.1"


@pytest.mark.parametrize("listener", ["tls_port", "ssl_port"])
@pytest_twisted.ensureDeferred
async def test_tls_1_1_is_refused_and_1_2_and_1_3_are_served(
    listener: str, request: pytest.FixtureRequest, ca: TrustedCA
) -> None:
    port: int = request.getfixturevalue(listener)
    assert await refused(port, unverified(**TLS_1_1))
    twelve = ca.context()
    twelve.maximum_version = ssl.TLSVersion.TLSv1_2
    agreed = await in_thread(handshake, port, twelve, "gw.example.test")
    assert agreed.version == "TLSv1.2"
    assert agreed.cipher.startswith("ECDHE-") and (
        "GCM" in agreed.cipher or "CHACHA" in agreed.cipher
    )
    agreed = await in_thread(handshake, port, ca.context(), "gw.example.test")
    assert agreed.version == "TLSv1.3"


@pytest.mark.parametrize("listener", ["tls_port", "ssl_port"])
@pytest_twisted.ensureDeferred
async def test_tls_1_2_without_forward_secrecy_or_with_cbc_is_refused(
    listener: str, request: pytest.FixtureRequest
) -> None:
    port: int = request.getfixturevalue(listener)
    tls12 = {"minimum": ssl.TLSVersion.TLSv1_2, "maximum": ssl.TLSVersion.TLSv1_2}
    for cipher in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256"):
        assert await refused(port, unverified(ciphers=cipher, **tls12)), cipher
    assert not await refused(port, unverified(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256", **tls12))


@pytest_twisted.ensureDeferred
async def test_a_renewed_certificate_is_served_without_a_restart(
    certs: Path, ca: TrustedCA, tls_port: int
) -> None:
    first = await in_thread(handshake, tls_port, ca.context(), "gw.example.test")
    _, renewed = ca.issue(certs, "gw.example.test", "127.0.0.1")
    assert renewed.serial_number != first.serial
    second = await in_thread(handshake, tls_port, ca.context(), "gw.example.test")
    assert second.serial == renewed.serial_number


@pytest_twisted.ensureDeferred
async def test_the_certificate_is_chosen_by_name_then_by_address(
    certs: Path, ca: TrustedCA
) -> None:
    _, alpha = ca.issue(certs, "alpha.test")
    _, beta = ca.issue(certs, "beta.test", "127.0.0.1")
    _, wild = ca.issue(certs, "*.wild.test")
    port = listen_on(f"tls:{certs}:port=0:interface=127.0.0.1")
    try:
        number = port.getHost().port
        shown = {}
        for name in ("alpha.test", "beta.test", "x.wild.test"):
            shown[name] = (await in_thread(handshake, number, ca.context(), name)).serial
        assert shown == {
            "alpha.test": alpha.serial_number,
            "beta.test": beta.serial_number,
            "x.wild.test": wild.serial_number,
        }
        # No name (https://127.0.0.1/): the certificate for the address connected to.
        by_address = ca.context()
        by_address.check_hostname = False
        assert (await in_thread(handshake, number, by_address, None)).serial == beta.serial_number
        # A name nobody serves: the first certificate, which the client refuses.
        with pytest.raises(ssl.SSLCertVerificationError):
            await in_thread(handshake, number, ca.context(), "other.test")
    finally:
        await port.stopListening()


def test_a_file_rewritten_in_place_is_read_again_within_a_second(
    certs: Path, ca: TrustedCA
) -> None:
    path, first = ca.issue(certs, "gw.example.test")
    clock = task.Clock()
    directory = CertificateDirectory(str(certs), clock)
    directory.refresh()
    assert [h.serial for h in directory.held] == [first.serial_number]
    # Rewritten in place: the directory itself does not change.
    key, second = new_leaf(ca.authority, ["gw.example.test"], now())
    stat = os.stat(certs)
    data = private_key_pem(key) + certificate_pem(second)
    with open(path, "r+b") as f:
        f.truncate()
        f.write(data)
    os.utime(certs, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5))
    directory.refresh()
    assert [h.serial for h in directory.held] == [first.serial_number]
    clock.advance(1)
    directory.refresh()
    assert [h.serial for h in directory.held] == [second.serial_number]


def test_an_unreadable_file_keeps_what_it_held(certs: Path, ca: TrustedCA) -> None:
    path, first = ca.issue(certs, "gw.example.test")
    clock = task.Clock()
    directory = CertificateDirectory(str(certs), clock)
    directory.refresh()
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    clock.advance(1)
    directory.refresh()
    assert [h.serial for h in directory.held] == [first.serial_number]
    assert directory.context("gw.example.test", None) is not None


def test_tls_endpoint_strings_are_read_as_twisted_reads_them(tmp_path: Path) -> None:
    assert tls_endpoint_parts("tls:/var/lib/oproxy/certs:port=443") == (
        "/var/lib/oproxy/certs",
        443,
        50,
        "::",
    )
    assert tls_endpoint_parts(r"tls:/c\:d:8443:interface=127.0.0.1") == (
        "/c:d",
        8443,
        50,
        "127.0.0.1",
    )
    assert tls_endpoint_parts("tcp:443") is None
    assert isinstance(server_endpoint(reactor, f"tls:{tmp_path}:port=0"), DirectoryTLSEndpoint)
    assert https_port(("tcp:80", "tls:/c:port=8443")) == 8443
    assert https_port(("ssl:9443:privateKey=k.pem",)) == 9443
    assert https_port(("tcp:80",)) is None
