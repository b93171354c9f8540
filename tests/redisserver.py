"""
A real ``redis-server`` for the tests that need one, on a free loopback port.

Without ``redis-server`` those tests are skipped, except under CI (``CI``
set), where a missing server is a failure rather than a silent gap.  Import
the fixture into a test module to use it: ``from tests.redisserver import
redis_server``; it is module-scoped, so each module gets a fresh server.

``redis_tls_server`` is the same server speaking only TLS (``--port 0
--tls-port``), with a certificate for ``localhost`` signed by a private CA
that :func:`make_certificates` makes for the module.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Certificates:
    """PEM files: a private CA, what it signed, and a CA that signed none of it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    names: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def make_certificates(directory: Path, server_names: list[x509.GeneralName]) -> Certificates:
    """A CA, a server certificate for ``server_names`` and a client certificate it signed."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("oproxy test CA", ca_key, None)
    files: dict[str, bytes] = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for role, subject, names, usage in (
        ("server", "redis", server_names, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", "oproxy", None, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(subject, key, (ca, ca_key), names=names, usage=usage)
        files[f"{role}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{role}-key.pem"] = _key_pem(key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("oproxy test CA", other_key, None)  # the same name, another key
    files["other-ca.pem"] = other.public_bytes(serialization.Encoding.PEM)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        other_ca=directory / "other-ca.pem",
    )


#: The names the TLS server's certificate is for: ``localhost`` only, so
#: that connecting to 127.0.0.1 shows the name is checked.
SERVER_NAMES: list[x509.GeneralName] = [x509.DNSName("localhost")]


class RedisServer:
    """
    A ``redis-server`` on loopback (TCP and a unix socket) that can be restarted.

    :param tls: serve TLS only, with these certificates.
    :param auth_clients: ``--tls-auth-clients``: ``no``, ``yes`` (a client
        certificate signed by the CA is required) or ``optional``.
    """

    def __init__(
        self,
        executable: str,
        directory: Path,
        tls: Certificates | None = None,
        auth_clients: str = "no",
    ) -> None:
        self.executable = executable
        self.directory = directory
        self.port = free_port()
        self.socket = directory / "redis.sock"
        self.tls = tls
        self.auth_clients = auth_clients
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return self.tls_url()
        return f"redis://127.0.0.1:{self.port}"

    def tls_url(self, host: str = "localhost", **parameters: str | Path) -> str:
        """
        A ``rediss://`` URL for this server; by default one that trusts the
        test CA (``ssl_ca_certs``), which ``ssl_ca_certs=""`` leaves out.
        """
        assert self.tls is not None
        parameters.setdefault("ssl_ca_certs", self.tls.ca)
        query = "&".join(f"{k}={quote(str(v))}" for k, v in parameters.items() if str(v))
        return f"rediss://{host}:{self.port}" + (f"?{query}" if query else "")

    def _listening(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls.server_cert),
            "--tls-key-file",
            str(self.tls.server_key),
            "--tls-ca-cert-file",
            str(self.tls.ca),
            "--tls-auth-clients",
            self.auth_clients,
        ]

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
            if self.tls is None:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
            with context.wrap_socket(s, server_hostname="localhost") as secured:
                secured.sendall(b"PING\r\n")
                return secured.recv(16).startswith(b"+PONG")

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                *self._listening(),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                raise AssertionError(f"redis-server exited: {output.decode(errors='replace')}")
            try:
                if self._ping():
                    return
            except OSError:  # ssl.SSLError included
                time.sleep(0.01)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            if self.process.stdout:
                self.process.stdout.close()
            self.process = None


def redis_executable() -> str:
    """``redis-server``; the test is skipped without it (failed under CI)."""
    executable = shutil.which("redis-server")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI needs these tests to run")
        pytest.skip("redis-server is not installed")
    return executable


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"), SERVER_NAMES)


@pytest.fixture(scope="module")
def redis_tls_server(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable(), tmp_path_factory.mktemp("redis-tls"), certificates)
    server.start()
    yield server
    server.stop()
