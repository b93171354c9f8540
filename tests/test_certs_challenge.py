"""
The plain-HTTP endpoint: HTTP-01 answers for the tokens being offered, a
redirect to HTTPS for everything else; and the service that binds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.test.requesthelper import DummyRequest

from oproxy.certs.challenge import ChallengeAnswers, PlainHTTPService, plain_http_site
from oproxy.service import CannotServe
from tests.e2e.conftest import free_port


def listen(description: str, site: Any) -> Any:
    return reactor.listenTCP(int(description.split(":")[1]), site, interface="127.0.0.1")


@pytest.fixture
def answers() -> ChallengeAnswers:
    found = ChallengeAnswers()
    found.publish("tok-EN_1", "tok-EN_1.thumbprint")
    return found


@pytest.fixture
def served(answers: ChallengeAnswers) -> Iterator[tuple[str, PlainHTTPService]]:
    port = free_port()
    service = PlainHTTPService(
        f"tcp:{port}", plain_http_site(answers, 8443), listen, answers_challenges=True
    )
    service.privilegedStartService()
    service.startService()
    yield f"http://127.0.0.1:{port}", service
    pytest_twisted.blockon(service.stopService())


async def get(url: str, **headers: str) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    response = await treq.get(
        url, allow_redirects=False, headers={k: [v] for k, v in headers.items()}
    )
    body = await response.content()
    return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest_twisted.ensureDeferred
async def test_an_offered_token_is_answered(served: tuple[str, PlainHTTPService]) -> None:
    url, _ = served
    code, headers, body = await get(f"{url}/.well-known/acme-challenge/tok-EN_1")
    assert (code, body) == (200, b"tok-EN_1.thumbprint")
    assert headers[b"Content-Type"] == [b"text/plain; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_a_withdrawn_or_unknown_token_is_not_found(
    served: tuple[str, PlainHTTPService], answers: ChallengeAnswers
) -> None:
    url, _ = served
    answers.withdraw("tok-EN_1")
    for token in ("tok-EN_1", "other", "..%2f..%2fetc"):
        code, _, _ = await get(f"{url}/.well-known/acme-challenge/{token}")
        assert code == 404


@pytest_twisted.ensureDeferred
async def test_everything_else_is_redirected_to_https(
    served: tuple[str, PlainHTTPService],
) -> None:
    url, _ = served
    code, headers, _ = await get(f"{url}/v1/models?limit=2", Host="gw.example.com")
    assert code == 308
    assert headers[b"Location"] == [b"https://gw.example.com:8443/v1/models?limit=2"]
    code, headers, _ = await get(f"{url}/", Host="gw.example.com:80")
    assert headers[b"Location"] == [b"https://gw.example.com:8443/"]
    code, headers, _ = await get(f"{url}/x", Host="[::1]:80")
    assert headers[b"Location"] == [b"https://[::1]:8443/x"]
    code, _, _ = await get(f"{url}/x", Host="evil.example/\r\nx")
    assert code == 400


def test_port_443_is_left_out_of_the_location() -> None:
    request = DummyRequest([b"v1"])
    request.path = request.uri = b"/v1"
    request.requestHeaders.setRawHeaders(b"host", [b"gw.example.com"])
    body = plain_http_site(None, 443).resource.render(request)
    assert request.responseCode == 308
    assert request.responseHeaders.getRawHeaders(b"location") == [b"https://gw.example.com/v1"]
    assert b"https://gw.example.com/v1" in body


def test_without_acme_the_challenge_path_is_redirected_too() -> None:
    request = DummyRequest([b".well-known", b"acme-challenge", b"tok"])
    request.path = request.uri = b"/.well-known/acme-challenge/tok"
    request.requestHeaders.setRawHeaders(b"host", [b"lan.test"])
    plain_http_site(None, None).resource.render(request)
    assert request.responseCode == 308


def test_a_port_in_use_stops_the_daemon_with_one_line(
    served: tuple[str, PlainHTTPService],
) -> None:
    _, service = served
    assert service.port is not None
    taken = service.port.getHost().port
    other = PlainHTTPService(
        f"tcp:{taken}", plain_http_site(None, None), listen, answers_challenges=False
    )
    with pytest.raises(CannotServe, match=f"cannot listen on {taken}"):
        other.privilegedStartService()
