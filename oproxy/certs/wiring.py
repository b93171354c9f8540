"""
How the composition root puts certificates into a process's tree.

Exactly one process makes certificates: the single process, or the master
when there are workers (it lives across worker restarts, serves no API
traffic, and needs no lock or lease to be the only one).  That process
also binds the plain-HTTP endpoints (``acme.http01``, ``redirect_http``)
before privileges are dropped, so the ACME server's challenge requests
reach the process holding the answers.  Every serving process (workers
included) serves the ``tls:`` directory, and reports on the certificates
in ``/v1/health`` and ``/metrics``, from the files.

An endpoint named in ``listen`` and as a plain-HTTP endpoint is the
latter: ``listen: ["tcp:80", "tls:..."]`` with ``http01: tcp:80`` answers
challenges and redirects on port 80, and serves the API on 443.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import threads
from twisted.internet.interfaces import IListeningPort

from oproxy.certs.challenge import ChallengeAnswers, PlainHTTPService, plain_http_site
from oproxy.certs.local import LocalJob
from oproxy.certs.renewal import CertificateService, Job, RunBlocking
from oproxy.certs.report import CertificateReport, status_path
from oproxy.certs.tls import https_port, tls_endpoint_parts
from oproxy.config import Config
from oproxy.config.certificates import state_directory


def serving_listen(config: Config) -> tuple[str, ...]:
    """The endpoints that serve the API: ``listen`` without the plain-HTTP ones."""
    plain = config.certificates.plain_http
    return tuple(each for each in config.listen if each not in plain)


def serves_directory(config: Config) -> bool:
    """Whether a ``tls:`` listener serves the certificate directory."""
    for each in config.listen:
        parts = tls_endpoint_parts(each)
        if parts is not None and parts[0] == config.certificates.directory:
            return True
    return False


def certificate_report(config: Config) -> CertificateReport | None:
    """What health and metrics read, when the daemon has certificates to speak of."""
    certificates = config.certificates
    tls = any(tls_endpoint_parts(each) is not None for each in config.listen)
    if not (tls or certificates.makes_certificates):
        return None
    status = None
    if certificates.makes_certificates:
        status = status_path(state_directory(config.state.path))
    return CertificateReport(certificates.directory, status)


def hsts_header(config: Config) -> bytes | None:
    max_age = config.certificates.hsts
    return None if max_age is None else b"max-age=%d" % max_age


def run_in_thread(reactor: Any) -> RunBlocking:
    """Blocking calls in the reactor's thread pool (stopped after the tree is)."""

    def run(f: Callable[..., Any], *args: Any) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def certificate_services(
    config: Config,
    reactor: Any,
    listen: Callable[[str, Any], IListeningPort],
    run_blocking: RunBlocking | None = None,
) -> list[service.IService]:
    """
    The services of the one process that makes certificates: renewal, and
    the plain-HTTP endpoints.

    :param listen: binds an endpoint string with a factory, at once.
    """
    certificates = config.certificates
    state = state_directory(config.state.path)
    answers = ChallengeAnswers() if certificates.acme is not None else None
    jobs: list[Job] = []
    extra: dict[str, dict[str, str]] = {}
    if certificates.acme is not None and answers is not None:
        # Imported here: the ACME client and requests cost a worker 140 ms
        # and their memory at every start, and only this process runs them.
        from oproxy.certs.acme_client import AcmeJob

        jobs.append(AcmeJob(certificates.acme, state, certificates.directory, answers))
        extra["acme"] = {"directory": certificates.acme.directory}
    if certificates.local is not None and certificates.local.names:
        jobs.append(LocalJob(certificates.local.names, state, certificates.directory, reactor))
    found: list[service.IService] = []
    if jobs:
        note = None
        if not serves_directory(config):
            note = (
                f"no tls: listener serves {certificates.directory}; add "
                f'"tls:{certificates.directory}:port=443" to listen to serve what is made there'
            )
        found.append(
            CertificateService(
                reactor,
                jobs,
                run_blocking or run_in_thread(reactor),
                status_path(state),
                extra=extra,
                note=note,
            )
        )
    port = https_port(serving_listen(config))
    for endpoint in certificates.plain_http:
        challenges = certificates.acme is not None and endpoint == certificates.acme.http01
        site = plain_http_site(answers if challenges else None, port)
        found.append(PlainHTTPService(endpoint, site, listen, answers_challenges=challenges))
    return found
