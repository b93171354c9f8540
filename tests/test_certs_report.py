"""
What ``/v1/health`` and ``/metrics`` say about certificates: computed from
the files, so every process says the same; HSTS on answers over TLS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from oproxy.certs.files import iso
from oproxy.certs.report import EXPIRY_METRIC, STATUS_FILE, CertificateReport
from oproxy.config import StateConfig
from oproxy.config.certificates import CertificatesConfig, LocalConfig
from oproxy.metrics import MULTIPROCESS_ENV, Metrics
from tests.certificates import TrustedCA
from tests.conftest import Proxy


def expiries(text: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name == EXPIRY_METRIC:
            found = {s.labels["name"]: s.value for s in family.samples}
    return found


@pytest.fixture
def certified(tmp_path: Path, proxy_factory: Any) -> tuple[Proxy, Path, Path]:
    certs = tmp_path / "certs"
    ca = TrustedCA.make(tmp_path)
    ca.issue(certs, "gw.example.test", "10.0.0.1")
    proxy = proxy_factory(
        state=StateConfig(path=str(tmp_path / "state.db")),
        certificates=CertificatesConfig(
            directory=str(certs), local=LocalConfig(names=("gw.example.test",))
        ),
    )
    return proxy, certs, tmp_path / STATUS_FILE


@pytest_twisted.ensureDeferred
async def test_health_shows_the_certificates_and_why_a_renewal_fails(
    certified: tuple[Proxy, Path, Path],
) -> None:
    proxy, _, status = certified
    response = await proxy.client.get(proxy.v1("health"))
    document = await response.json()
    part = document["certificates"]
    assert part["status"] == "ok"
    (served,) = part["served"]
    assert served["file"] == "gw.example.test.pem"
    assert served["names"] == ["gw.example.test", "10.0.0.1"]
    assert served["days_left"] == 365.0
    status.write_text(
        json.dumps(
            {
                "acme": {
                    "state": "failing",
                    "error": "cannot reach the ACME server at https://acme.test/dir: "
                    "connection refused",
                }
            }
        )
    )
    response = await proxy.client.get(proxy.v1("health"))
    document = await response.json()
    assert response.code == 200
    assert document["status"] == "degraded"
    assert document["certificates"]["acme"]["state"] == "failing"
    assert document["certificates"]["problems"] == [
        "acme renewal failing: cannot reach the ACME server at https://acme.test/dir: "
        "connection refused"
    ]


@pytest_twisted.ensureDeferred
async def test_metrics_show_each_names_expiry_from_the_files(
    certified: tuple[Proxy, Path, Path], tmp_path: Path
) -> None:
    proxy, certs, _ = certified
    response = await treq.get(f"{proxy.url}/metrics")
    found = expiries((await response.content()).decode())
    report = CertificateReport(str(certs), None)
    (held,) = report.held()
    assert found == {"gw.example.test": held.not_after, "10.0.0.1": held.not_after}
    # Renewed: the next scrape says so.
    _, renewed = TrustedCA.make(tmp_path).issue(certs, "gw.example.test", "10.0.0.1")
    response = await treq.get(f"{proxy.url}/metrics")
    found = expiries((await response.content()).decode())
    assert found["gw.example.test"] == renewed.not_valid_after_utc.timestamp()


def test_every_worker_scrapes_the_same_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    certs = tmp_path / "certs"
    TrustedCA.make(tmp_path).issue(certs, "a.test")
    workers = [Metrics(None), Metrics(None)]
    for metrics in workers:
        metrics.add_collector(CertificateReport(str(certs), None))
    scraped = [expiries(metrics.scrape().decode()) for metrics in workers]
    assert scraped[0] == scraped[1] and set(scraped[0]) == {"a.test"}


def test_an_expired_certificate_makes_the_daemon_degraded(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    TrustedCA.make(tmp_path).issue(certs, "a.test")
    report = CertificateReport(str(certs), None)
    (held,) = report.held()
    later = report.health(held.not_after + 1)
    assert later["status"] == "degraded"
    assert later["problems"] == ["certificate for a.test has expired"]
    assert report.health(held.not_after - 1)["status"] == "ok"
    assert later["served"][0]["not_after"] == iso(held.not_after)


def test_the_files_are_read_again_only_when_they_change(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ca = TrustedCA.make(tmp_path)
    path, _ = ca.issue(certs, "a.test")
    report = CertificateReport(str(certs), None)
    first = report.held()
    assert report.held() is first
    os.utime(path, ns=(1, 1))
    assert report.held() is not first


@pytest_twisted.ensureDeferred
async def test_hsts_is_sent_over_tls_only(proxy_factory: Any) -> None:
    proxy = proxy_factory(certificates=CertificatesConfig(hsts=600))
    response = await proxy.client.get(f"{proxy.url}/healthz")
    await response.content()
    # Plain HTTP: a browser must ignore it, and it says nothing true here.
    assert response.headers.getRawHeaders(b"strict-transport-security") is None
