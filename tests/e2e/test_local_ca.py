"""
HTTPS on a LAN with the daemon's own CA: the two commands of docs/tls.rst,
and ``certificates.local.names`` with a redirect from plain HTTP and HSTS,
called by the openai SDK that trusts the CA file and nothing else.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for, wait_for_port


def oproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def sdk(base_url: str, ca: Path) -> openai.OpenAI:
    """The SDK trusting only the CA file."""
    return openai.OpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca))),
    )


def chat(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "on the LAN?"}]
    )
    return reply.choices[0].message.content or ""


def test_https_on_the_lan_in_two_commands(
    workdir: Path, fake_ollama_process: Daemon, tmp_path: Path
) -> None:
    made = oproxy("certs", "local", "localhost", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    listen = next(
        line.split('"')[1] for line in made.stdout.splitlines() if line.startswith("Serve it:")
    )
    port = free_port()
    listen = listen.replace("port=8443", f"port={port}:interface=127.0.0.1")
    ca_path = oproxy("certs", "ca-path")
    assert ca_path.returncode == 0
    ca = Path(ca_path.stdout.strip())
    assert "update-ca-certificates" in ca_path.stderr
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oproxy",
            "serve",
            "--listen",
            listen,
            "--backend",
            fake_ollama_process.url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        for host in ("localhost", "127.0.0.1"):
            with sdk(f"https://{host}:{port}/v1", ca) as client:
                assert chat(client)
        # What `oproxy certs ca-path` tells clients to do works as said.
        url = f"https://localhost:{port}/v1"
        script = (
            f"import openai; c = openai.OpenAI(base_url={url!r}, api_key='x', max_retries=0);"
            "print(len(c.models.list().data))"
        )
        trusted = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SSL_CERT_FILE": str(ca)},
            check=False,
        )
        assert trusted.returncode == 0, trusted.stderr
        assert int(trusted.stdout) > 0
        # Without the CA, the certificate is not trusted.
        with (
            openai.OpenAI(
                base_url=f"https://localhost:{port}/v1",
                api_key="unused",
                max_retries=0,
                http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context()),
            ) as untrusting,
            pytest.raises(openai.APIConnectionError),
        ):
            untrusting.models.list()
    finally:
        process.terminate()
        process.wait(30)


def test_local_names_at_start_with_a_redirect_and_hsts(
    workdir: Path, fake_ollama_process: Daemon
) -> None:
    port, plain = free_port(), free_port()
    certs = workdir / "local-certs"
    config = workdir / "local.yaml"
    config.write_text(
        f"""
listen: ["tls:{certs}:port={port}:interface=127.0.0.1"]
workers: 2
backends: [{{name: local, url: "{fake_ollama_process.url}"}}]
certificates:
  directory: {certs}
  local: {{names: [localhost, 127.0.0.1, oproxy.lan]}}
  hsts: 600
  redirect_http: "tcp:{plain}:interface=127.0.0.1"
"""
    )
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, "local")
    try:
        state = Path(os.environ["XDG_STATE_HOME"]) / "oproxy"
        ca = state / "ca" / "oproxy-ca.pem"
        wait_for(lambda: (certs / "localhost.pem").exists() and ca.exists())
        with sdk(f"https://localhost:{port}/v1", ca) as client:
            assert chat(client)
        verify = ssl.create_default_context(cafile=str(ca))
        answer = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=verify)
        assert answer.headers["strict-transport-security"] == "max-age=600"
        redirected = httpx.get(f"http://127.0.0.1:{plain}/v1/models?x=1")
        assert redirected.status_code == 308
        assert redirected.headers["location"] == f"https://127.0.0.1:{port}/v1/models?x=1"
        followed = httpx.get(
            f"http://127.0.0.1:{plain}/v1/models", verify=verify, follow_redirects=True
        )
        assert followed.status_code == 200 and followed.json()["data"]
        health = httpx.get(f"https://127.0.0.1:{port}/v1/health", verify=verify).json()
        assert health["certificates"]["local"]["state"] == "ok"
        assert health["certificates"]["served"][0]["days_left"] == 365.0
        listed = oproxy("certs", "-c", str(config), "status", "--json")
        assert json.loads(listed.stdout)["served"][0]["names"] == [
            "localhost",
            "oproxy.lan",
            "127.0.0.1",
        ]
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert "PRIVATE KEY" not in log
    key = (state / "ca" / "oproxy-ca-key.pem").read_text().split("-----")[2].split()
    assert not any(line[:40] in log for line in key)
