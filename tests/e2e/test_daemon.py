"""
The daemon as a process: HTTPS on ``ssl:`` and ``tls:`` endpoints, and
start-up refusal of a bad configuration.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path

import openai
import pytest

from tests.certificates import self_signed
from tests.e2e.conftest import TWISTD, Daemon, free_port, start_twistd, wait_for_port


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: its key and its file."""
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    self_signed(cert_path, key_path, "localhost")
    return key_path, cert_path


def chat_over_https(port: int, cert: Path) -> str:
    with openai.OpenAI(
        base_url=f"https://localhost:{port}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert)),
    ) as client:
        reply = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "secure?"}]
        )
    return reply.choices[0].message.content or ""


def serve_https(
    workdir: Path, fake: Daemon, name: str, listen: str, port: int, workers: int
) -> Daemon:
    """Start the daemon on a TLS endpoint, with ``workers`` processes."""
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"""
listen: ["{listen}"]
backends: [{{name: local, url: "{fake.url}"}}]
workers: {workers}
"""
    )
    return start_twistd(["oproxy", "--config", str(config)], port, workdir, name)


@pytest.mark.parametrize("workers", [1, 2])
def test_https_with_ssl_endpoint(workdir: Path, fake_ollama_process: Daemon, workers: int) -> None:
    key, cert = make_certificate(workdir)
    port = free_port()
    listen = f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
    daemon = serve_https(workdir, fake_ollama_process, f"ssl-{workers}", listen, port, workers)
    try:
        for _ in range(3):
            assert chat_over_https(port, cert)
    finally:
        daemon.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_https_with_tls_certificate_directory(
    workdir: Path, fake_ollama_process: Daemon, workers: int
) -> None:
    certs = workdir / f"certs-{workers}"
    certs.mkdir()
    key, cert = make_certificate(workdir)
    (certs / "localhost.pem").write_bytes(key.read_bytes() + cert.read_bytes())
    port = free_port()
    listen = f"tls:{certs}:port={port}:interface=127.0.0.1"
    daemon = serve_https(workdir, fake_ollama_process, f"tls-{workers}", listen, port, workers)
    try:
        for _ in range(3):
            assert chat_over_https(port, cert)
    finally:
        daemon.stop()


def run_twistd(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_config_exits_nonzero_naming_the_key(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text("backends:\n  - {name: x, url: 'http://127.0.0.1:1', colour: red}\n")
    result = run_twistd("oproxy", "--config", str(bad), workdir=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "backends[0].colour" in output
    assert "Traceback" not in output


def test_exposed_without_keys_refuses_to_start(workdir: Path) -> None:
    result = run_twistd("oproxy", "--listen", f"tcp:{free_port()}", workdir=workdir)
    assert result.returncode != 0
    assert "anonymous" in result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is missing"
)
@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activation(
    workdir: Path, fake_ollama_process: Daemon, workers: int
) -> None:
    port = free_port()
    config = workdir / f"activated-{workers}.yaml"
    config.write_text(
        f"""
listen: ["systemd:domain=INET:index=0"]
backends: [{{name: local, url: "{fake_ollama_process.url}"}}]
auth: {{anonymous: true}}
workers: {workers}
"""
    )
    log = workdir / f"activated-{workers}.log"
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=http",
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "oproxy",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The socket exists before the daemon: the first request starts it.
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30
        ) as client:
            for _ in range(3):
                reply = client.chat.completions.create(
                    model="llama3.2", messages=[{"role": "user", "content": "activated?"}]
                )
                assert reply.choices[0].message.content
    finally:
        process.terminate()
        process.wait(30)


def test_json_log_format_for_shippers(workdir: Path, fake_ollama_process: Daemon) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logger=oproxy.logs.json_observer",
            "oproxy",
            "--backend",
            fake_ollama_process.url,
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ) as client:
            client.models.list()
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    records = [json.loads(line) for line in output.decode().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert any("starting on" in m for m in messages)
    assert any("GET /v1/models" in m for m in messages)
