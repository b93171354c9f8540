"""
The ``certificates:`` section as the issue writes it, what each value may
be, and how the tree is built from it: which process makes certificates,
which endpoints serve the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from oproxy.certs.challenge import PlainHTTPService
from oproxy.certs.renewal import CertificateService
from oproxy.certs.wiring import hsts_header, serving_listen
from oproxy.config import ConfigError, load_config
from oproxy.config.certificates import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, CertificatesConfig
from oproxy.reload import Reloader
from oproxy.tap import Options, makeService
from oproxy.workers import WorkerPool
from tests.test_docs import ENVIRON, yaml_blocks

CONTRACT = """
listen: ["tcp:80", "tls:/var/lib/oproxy/certs:port=443"]
auth: {keys: [{name: ops, key: sk-ops}]}
certificates:
  directory: /var/lib/oproxy/certs
  acme:
    email: ops@example.com
    domains: [gw.example.com]
    directory: https://acme-v02.api.letsencrypt.org/directory
    ca_bundle: /path/to/root.pem
    http01: "tcp:80"
  local:
    names: [oproxy.lan, 192.168.1.20, localhost]
"""


def test_the_issues_contract_loads() -> None:
    config = load_config(CONTRACT, {})
    certificates = config.certificates
    assert certificates.directory == "/var/lib/oproxy/certs"
    assert certificates.acme is not None
    assert certificates.acme.email == "ops@example.com"
    assert certificates.acme.domains == ("gw.example.com",)
    assert certificates.acme.directory == LETS_ENCRYPT
    assert certificates.acme.ca_bundle == "/path/to/root.pem"
    assert certificates.acme.http01 == "tcp:80"
    assert certificates.local is not None
    assert certificates.local.names == ("oproxy.lan", "192.168.1.20", "localhost")
    # tcp:80 answers challenges and redirects; the API is on 443 alone.
    assert serving_listen(config) == ("tls:/var/lib/oproxy/certs:port=443",)


def test_defaults() -> None:
    config = load_config(
        "certificates: {acme: {domains: [GW.Example.com.]}}", {"STATE_DIRECTORY": "/srv/st"}
    )
    certificates = config.certificates
    assert certificates.directory == "/srv/st/certs"
    assert certificates.acme is not None
    assert certificates.acme.domains == ("gw.example.com",)
    assert certificates.acme.directory == LETS_ENCRYPT
    assert certificates.acme.http01 == "tcp:80"
    assert certificates.acme.email is None
    assert certificates.hsts is None and certificates.redirect_http is None
    assert load_config(None, {"STATE_DIRECTORY": "/srv/st"}).certificates.directory == (
        "/srv/st/certs"
    )


def test_staging_names_lets_encrypts_staging() -> None:
    config = load_config("certificates: {acme: {domains: [a.example], directory: staging}}", {})
    assert config.certificates.acme is not None
    assert config.certificates.acme.directory == LETS_ENCRYPT_STAGING


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ("{acme: {email: a@b.c}}", "certificates.acme.domains", "is required"),
        ("{acme: {domains: []}}", "certificates.acme.domains", "at least one"),
        ("{acme: {domains: ['*.example.com']}}", "certificates.acme.domains[0]", "wildcard"),
        ("{acme: {domains: [192.168.1.2]}}", "certificates.acme.domains[0]", "host name"),
        (
            "{acme: {domains: [a.b], directory: 'http://x/dir'}}",
            "certificates.acme.directory",
            "https://",
        ),
        ("{acme: {domains: [a.b], http01: 'tls:/x'}}", "certificates.acme.http01", "plain TCP"),
        (
            "{local: {names: [ok.lan, 'bad name']}}",
            "certificates.local.names[1]",
            "host name or an IP",
        ),
        ("{hsts: sometimes}", "certificates.hsts", "true, false or a max-age"),
        (
            "{acme: {domains: [a.b], colour: red}}",
            "certificates.acme.colour",
            "not a known setting",
        ),
    ],
)
def test_bad_values_are_named_by_their_key(section: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(f"certificates: {section}", {})
    assert raised.value.key == key
    assert problem in raised.value.problem


def test_local_names_take_addresses_and_wildcards() -> None:
    config = load_config(
        "certificates: {local: {names: ['*.lan.test', '::1', 'Host.LAN', '192.168.001.20']}}", {}
    )
    assert config.certificates.local is not None
    assert config.certificates.local.names[:3] == ("*.lan.test", "::1", "host.lan")


def test_hsts() -> None:
    assert load_config("certificates: {hsts: true}", {}).certificates.hsts == 31536000
    config = load_config("certificates: {hsts: 600}", {})
    assert hsts_header(config) == b"max-age=600"
    assert hsts_header(load_config("certificates: {hsts: false}", {})) is None


def test_a_plain_http_endpoint_beyond_loopback_needs_no_keys() -> None:
    # It only redirects (and answers ACME): nothing there a key protects.
    config = load_config(
        """
listen: ["tcp:80", "tls:/c:port=443:interface=127.0.0.1"]
certificates: {redirect_http: "tcp:80"}
""",
        {},
    )
    assert serving_listen(config) == ("tls:/c:port=443:interface=127.0.0.1",)
    with pytest.raises(ConfigError, match="beyond loopback"):
        load_config(
            'listen: ["tcp:80", "tls:/c:port=443"]\ncertificates: {redirect_http: "tcp:80"}', {}
        )


def test_something_must_still_serve_the_api() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(
            'listen: ["tcp:80:interface=127.0.0.1"]\n'
            'certificates: {redirect_http: "tcp:80:interface=127.0.0.1"}',
            {},
        )
    assert raised.value.key == "listen"


def options(tmp_path: Path, workers: int) -> Options:
    config = tmp_path / "oproxy.yaml"
    config.write_text(
        f"""
listen: ["tcp:8080:interface=127.0.0.1", "tls:{tmp_path}/certs:port=8443:interface=127.0.0.1"]
workers: {workers}
backends: [{{name: local, url: "http://127.0.0.1:11434"}}]
state: {{path: '{tmp_path / "state.db"}'}}
certificates:
  acme: {{domains: [gw.example.com], http01: "tcp:8080:interface=127.0.0.1"}}
  local: {{names: [oproxy.lan]}}
"""
    )
    parsed = Options()
    parsed.parseOptions(["--config", str(config)])
    return parsed


def services(top: Any) -> list[Any]:
    return list(top)


@pytest.mark.parametrize("workers", [1, 2])
def test_one_process_makes_certificates_and_binds_the_challenge_port(
    tmp_path: Path, workers: int
) -> None:
    reactor = MemoryReactorClock()
    top = makeService(options(tmp_path, workers), reactor)
    found = services(top)
    renewal = [s for s in found if isinstance(s, CertificateService)]
    plain = [s for s in found if isinstance(s, PlainHTTPService)]
    assert len(renewal) == 1
    assert [job.kind for job in renewal[0].jobs] == ["acme", "local"]
    assert [s.description for s in plain] == ["tcp:8080:interface=127.0.0.1"]
    # Built, not bound: nothing listens until the tree starts.
    assert reactor.tcpServers == []
    if workers > 1:
        pool = next(s for s in found if isinstance(s, WorkerPool))
        # The workers serve the API on the TLS listener only.
        assert [d for _, d in pool._spec.listeners] == [
            f"tls:{tmp_path}/certs:port=8443:interface=127.0.0.1"
        ]


TLS_DOC = Path(__file__).resolve().parent.parent / "docs" / "tls.rst"


def test_the_https_guide_configurations_load() -> None:
    blocks = yaml_blocks(TLS_DOC.read_text())
    assert len(blocks) == 3
    for block in blocks:
        load_config(block, ENVIRON)


def test_a_name_is_either_public_or_local() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(
            "certificates: {acme: {domains: [gw.example.com]}, "
            "local: {names: [oproxy.lan, gw.example.com]}}",
            {},
        )
    assert raised.value.key == "certificates.local.names"
    assert "gw.example.com" in raised.value.problem


def test_a_reload_says_certificates_changes_need_a_restart(proxy: Any) -> None:
    changed = evolve(proxy.app.config, certificates=CertificatesConfig(hsts=60))
    said: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        said.append(str(event.get("log_format", "")))

    globalLogPublisher.addObserver(observe)
    try:
        reloader = Reloader(
            proxy.app,
            lambda: changed,
            lambda config: proxy.app.router,
            lambda config: proxy.app.cache,
            retire_cache=lambda cache: None,
        )
        assert reloader.reload()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert "certificates changes take effect at the next restart" in said
