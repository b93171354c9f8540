"""
Certificates from a real ACME server (pebble), obtained and renewed by the
daemon with two workers, the HTTP-01 challenges answered by the daemon
itself.

One daemon and one pebble for the module, in the order a deployment lives
it: the first certificate; a renewal (pebble issues 30-second
certificates, so one is due 20 seconds after it is issued) picked up by
both workers while clients keep calling, none of them failing; then pebble
gone, and the certificate in hand keeps serving while ``/v1/health`` says
why renewing fails.
"""

from __future__ import annotations

import glob
import json
import os
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from oproxy.certs.files import fingerprint, read_held
from tests.certificates import handshake, unverified
from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for
from tests.pebbleserver import Pebble, pebble_or_skip

DOMAIN = "gw.oproxy.test"
VALIDITY = 30


@pytest.fixture(scope="module")
def pebble(workdir: Path) -> Iterator[Pebble]:
    pebble_or_skip()
    server = Pebble(workdir, http_port=free_port(), validity=VALIDITY)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def root(pebble: Pebble, workdir: Path) -> Path:
    path = workdir / "pebble-root.pem"
    path.write_bytes(pebble.root())
    return path


@pytest.fixture(scope="module")
def certs(workdir: Path) -> Path:
    return workdir / "acme-certs"


@pytest.fixture(scope="module")
def state() -> Path:
    return Path(os.environ["XDG_STATE_HOME"]) / "oproxy"


@pytest.fixture(scope="module")
def daemon(
    workdir: Path, pebble: Pebble, certs: Path, fake_ollama_process: Daemon
) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / "acme.yaml"
    config.write_text(
        f"""
listen: ["tls:{certs}:port={port}:interface=127.0.0.1"]
workers: 2
backends: [{{name: local, url: "{fake_ollama_process.url}"}}]
certificates:
  directory: {certs}
  acme:
    email: ops@oproxy.test
    domains: [{DOMAIN}]
    directory: {pebble.directory_url}
    ca_bundle: {pebble.api_certificate}
    http01: "tcp:{pebble.http_port}:interface=127.0.0.1"
  hsts: true
"""
    )
    running = start_twistd(["oproxy", "--config", str(config)], port, workdir, "acme")
    yield running
    running.stop()


def status(state: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads((state / "certificates-status.json").read_text())
    except (OSError, ValueError):
        return {}
    return found.get("acme", {})


def served_file(certs: Path) -> str | None:
    held = read_held(str(certs / f"{DOMAIN}.pem"))
    return held.fingerprint if held is not None else None


def client(daemon: Daemon, root: Path) -> openai.OpenAI:
    """
    The SDK over HTTPS, trusting pebble's root alone, asking for the
    domain by SNI (and checking the certificate for it) while connecting
    to 127.0.0.1; no connection is kept, so each request is a new
    handshake, with whichever worker the kernel picks.
    """

    def ask_for_the_domain(request: httpx.Request) -> None:
        request.extensions["sni_hostname"] = DOMAIN

    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{daemon.port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=str(root)),
            event_hooks={"request": [ask_for_the_domain]},
            limits=httpx.Limits(max_keepalive_connections=0),
        ),
    )


def get(daemon: Daemon, path: str, verify: ssl.SSLContext) -> httpx.Response:
    """A GET over HTTPS, asking for the domain by SNI."""
    with httpx.Client(verify=verify, timeout=10) as http:
        request = http.build_request(
            "GET",
            f"https://127.0.0.1:{daemon.port}{path}",
            extensions={"sni_hostname": DOMAIN},
        )
        return http.send(request)


def served_by_daemon(daemon: Daemon) -> str:
    shown = handshake(daemon.port, unverified(), DOMAIN)
    return fingerprint(shown.certificate)


def test_a_certificate_is_obtained_with_the_daemon_answering_http01(
    daemon: Daemon, root: Path, certs: Path, state: Path
) -> None:
    wait_for(lambda: status(state).get("state") == "ok", 60)
    with client(daemon, root) as sdk:
        models = sdk.models.list()
        assert [m.id for m in models.data]
        reply = sdk.chat.completions.create(
            model=models.data[0].id, messages=[{"role": "user", "content": "over ACME?"}]
        )
        assert reply.choices[0].message.content
    held = read_held(str(certs / f"{DOMAIN}.pem"))
    assert held is not None and held.names == (DOMAIN,)
    assert held.issuer.startswith("Pebble Intermediate")
    assert held.lifetime <= VALIDITY
    assert "Answering ACME HTTP-01 challenges" in daemon.log.read_text()


def test_the_acme_server_validated_on_the_daemons_http01_port(
    daemon: Daemon, pebble: Pebble, state: Path
) -> None:
    wait_for(lambda: status(state).get("state") == "ok", 60)
    validated = f"http://{DOMAIN}:{pebble.http_port}/.well-known/acme-challenge/"
    assert validated in pebble.log()


def test_private_keys_are_private(daemon: Daemon, certs: Path, state: Path) -> None:
    wait_for(lambda: status(state).get("state") == "ok", 60)
    (account_key,) = glob.glob(str(state / "acme" / "*" / "account-key.pem"))
    for path in (certs / f"{DOMAIN}.pem", Path(account_key)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(Path(account_key).parent).st_mode) == 0o700


def test_a_renewal_is_served_by_both_workers_without_a_failed_request(
    daemon: Daemon, root: Path, certs: Path, state: Path
) -> None:
    wait_for(lambda: status(state).get("state") == "ok", 60)
    first = served_file(certs)
    assert first is not None
    results: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with client(daemon, root) as sdk:
            while not stop.is_set() and len(results) < 5000:
                try:
                    sdk.models.list()
                except Exception as e:
                    failures.append(e)
                else:
                    results.append("ok")

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        # Due two thirds into the certificate's 30 seconds.
        wait_for(lambda: served_file(certs) not in (None, first), VALIDITY * 2)
        renewed = served_file(certs)
        done = len(results)
        wait_for(lambda: len(results) >= done + 40, 60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert len(results) > 40
    # Every new connection now gets the new certificate...
    assert {served_by_daemon(daemon) for _ in range(20)} == {renewed}
    # ...from each worker, which says when it starts serving it.
    held = read_held(str(certs / f"{DOMAIN}.pem"))
    assert held is not None
    serial = f"serial {held.serial:x}"

    def both_workers_serve_it() -> bool:
        lines = [line for line in daemon.log.read_text().splitlines() if serial in line]
        return all(any(f"worker {n}:" in line for line in lines) for n in (0, 1))

    wait_for(both_workers_serve_it, 30)
    assert status(state)["state"] == "ok"
    # /metrics agrees, whichever worker answers.
    for _ in range(4):
        text = get(daemon, "/metrics", ssl.create_default_context(cafile=str(root))).text
        line = f'oproxy_certificate_expiry_seconds{{name="{DOMAIN}"}}'
        (value,) = [each.split()[-1] for each in text.splitlines() if each.startswith(line)]
        assert float(value) == held.not_after


def test_with_the_acme_server_gone_the_certificate_keeps_serving_and_health_says_why(
    daemon: Daemon, pebble: Pebble, certs: Path, state: Path
) -> None:
    wait_for(lambda: status(state).get("state") == "ok", 60)
    held = served_file(certs)
    pebble.stop()

    def health() -> dict[str, Any]:
        found: dict[str, Any] = get(daemon, "/v1/health", unverified()).json()
        return found

    wait_for(lambda: health()["certificates"].get("acme", {}).get("state") == "failing", 60)
    document = health()
    assert document["status"] == "degraded"
    acme = document["certificates"]["acme"]
    assert acme["error"].startswith(f"cannot reach the ACME server at {pebble.directory_url}")
    assert acme["failures"] >= 1 and acme["next_attempt"]
    assert served_file(certs) == held
    assert {served_by_daemon(daemon) for _ in range(10)} == {held}
    assert "the current certificate keeps serving" in daemon.log.read_text()


def test_no_private_key_is_ever_logged(daemon: Daemon, certs: Path, state: Path) -> None:
    log = daemon.log.read_text()
    assert "PRIVATE KEY" not in log
    (account_key,) = glob.glob(str(state / "acme" / "*" / "account-key.pem"))
    for path in (certs / f"{DOMAIN}.pem", Path(account_key)):
        text = path.read_text()
        body = text.split("-----BEGIN PRIVATE KEY-----")[1].split("-----END")[0]
        for line in body.split():
            assert line[:40] not in log
