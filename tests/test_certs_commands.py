"""
``oproxy certs local|ca-path|status``, as a person at a terminal runs them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from oproxy.cli import main


def run(*argv: str) -> int:
    try:
        main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.delenv("OPROXY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "oproxy"


def test_local_makes_the_ca_once_and_a_certificate(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("certs", "local", "oproxy.lan", "192.168.1.20", "localhost") == 0
    out = capsys.readouterr().out
    certificate = state / "certs" / "oproxy.lan.pem"
    assert f"Made the local CA: {state / 'ca' / 'oproxy-ca.pem'}" in out
    assert str(certificate) in out
    assert f'oproxy serve --listen "tls:{state / "certs"}:port=8443"' in out
    assert stat.S_IMODE(os.stat(certificate).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "ca" / "oproxy-ca-key.pem").st_mode) == 0o600
    ca = (state / "ca" / "oproxy-ca.pem").read_bytes()
    assert run("certs", "local", "other.lan") == 0
    assert "Made the local CA" not in capsys.readouterr().out
    assert (state / "ca" / "oproxy-ca.pem").read_bytes() == ca
    assert (state / "certs" / "other.lan.pem").exists()


def test_a_bad_name_is_refused_before_anything_is_made(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("certs", "local", "not a name") == 2
    assert "host name or an IP address" in capsys.readouterr().err
    assert not state.exists()


def test_ca_path_prints_the_file_and_how_to_trust_it(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("certs", "ca-path") == 1
    assert "oproxy certs local" in capsys.readouterr().err
    run("certs", "local", "oproxy.lan")
    capsys.readouterr()
    assert run("certs", "ca-path") == 0
    captured = capsys.readouterr()
    path = str(state / "ca" / "oproxy-ca.pem")
    # Standard output is the path alone: export SSL_CERT_FILE="$(oproxy certs ca-path)".
    assert captured.out == path + "\n"
    for how in (
        "update-ca-certificates",
        "security add-trusted-cert",
        "certutil -addstore",
        "Firefox",
        "security.enterprise_roots.enabled",
        f"SSL_CERT_FILE={path}",
        f"REQUESTS_CA_BUNDLE={path}",
        f"NODE_EXTRA_CA_CERTS={path}",
    ):
        assert how in captured.err


def test_status_lists_the_certificates(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("certs", "status") == 0
    assert "No certificates in" in capsys.readouterr().out
    run("certs", "local", "oproxy.lan", "10.1.2.3")
    capsys.readouterr()
    assert run("certs", "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["FILE", "NAMES", "ISSUER", "EXPIRES", "DAYS", "LEFT"]
    assert lines[1].startswith("oproxy.lan.pem  oproxy.lan, 10.1.2.3  oproxy local CA ")
    assert lines[1].endswith("365.0")
    assert run("certs", "status", "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["directory"] == str(state / "certs")
    (only,) = document["served"]
    assert only["names"] == ["oproxy.lan", "10.1.2.3"]
    assert only["days_left"] == 365.0
    assert only["issuer"].startswith("oproxy local CA")


def test_the_config_file_says_where_certificates_go(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "oproxy.yaml"
    config.write_text(f"certificates: {{directory: {tmp_path / 'elsewhere'}}}\n")
    assert run("certs", "-c", str(config), "local", "a.lan") == 0
    assert (tmp_path / "elsewhere" / "a.lan.pem").exists()
    assert (state / "ca" / "oproxy-ca.pem").exists()
