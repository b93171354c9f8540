"""
The plain-HTTP side: ACME's HTTP-01 answers, and a redirect to HTTPS.

An ACME server proves that we control a name by fetching
``http://NAME/.well-known/acme-challenge/TOKEN`` and expecting the key
authorization we computed for it.  The answers live in memory, in the
process that runs ACME (the only one: a single process, or the master of
workers), and that same process binds the ``http01`` endpoint: whichever
connection the ACME server opens, it reaches the process holding the
answer.  Workers never need to know a token, and nothing is written to disk
or to a store that could go stale.

Every other request on that endpoint (or on ``redirect_http``) is sent to
the same host and path over HTTPS, with ``308`` so that a ``POST`` stays a
``POST``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web import resource, server

from oproxy.service import bound

log = Logger()

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"

#: A Host header we are willing to put in a Location: a name, an IPv4
#: address or a bracketed IPv6 one, with an optional port.
_HOST = re.compile(rb"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class ChallengeAnswers:
    """
    The HTTP-01 answers being offered now, by token.

    Published from the thread that runs the ACME client, read by the
    reactor's thread: a lock keeps both views whole.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}

    def publish(self, token: str, answer: str) -> None:
        with self._lock:
            self._answers[token] = answer

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._answers.pop(token, None)

    def get(self, token: str) -> str | None:
        with self._lock:
            return self._answers.get(token)


class PlainHTTP(resource.Resource):
    """
    Challenge answers (given ``answers``) and a redirect for the rest.

    :param https_port: where HTTPS is served (omitted from the URL when 443).
    """

    isLeaf = True

    def __init__(self, answers: ChallengeAnswers | None, https_port: int | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._answers = answers
        self._port = https_port or 443

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        path: bytes = request.path
        if self._answers is not None and path.startswith(CHALLENGE_PREFIX):
            token = path[len(CHALLENGE_PREFIX) :].decode("ascii", "replace")
            answer = self._answers.get(token) if _TOKEN.match(token) else None
            if answer is None:
                request.setResponseCode(404)
                return b"no such challenge\n"
            return answer.encode("ascii")
        host = self._host(request)
        if host is None:
            request.setResponseCode(400)
            return b"a request here needs a valid Host header\n"
        port = b"" if self._port == 443 else b":%d" % self._port
        location = b"https://" + host + port + bytes(request.uri)
        request.setResponseCode(308)
        request.setHeader(b"location", location)
        request.setHeader(b"connection", b"close")
        return b"HTTPS only: " + location + b"\n"

    @staticmethod
    def _host(request: Any) -> bytes | None:
        given = request.getHeader(b"host")
        if given is None:
            local = request.getHost()
            text = getattr(local, "host", "")
            given = (f"[{text}]" if ":" in text else text).encode("ascii", "replace")
        match = _HOST.match(given.strip())
        return match.group(1) if match else None


class PlainHTTPSite(server.Site):
    """No access line per redirect: the API's requests are the ones worth a line."""

    def log(self, request: Any) -> None:
        pass


def plain_http_site(answers: ChallengeAnswers | None, https_port: int | None) -> server.Site:
    site = PlainHTTPSite(PlainHTTP(answers, https_port), timeout=30)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    site.noisy = False
    return site


class PlainHTTPService(service.Service):
    """
    Binds a plain-HTTP endpoint before privileges are dropped (port 80),
    serves it while running, closes it on stop.

    :param listen: binds ``description`` with the site, synchronously.
    """

    def __init__(
        self,
        description: str,
        site: server.Site,
        listen: Any,
        *,
        answers_challenges: bool,
    ) -> None:
        self.description = description
        self.site = site
        self._listen = listen
        self._answers_challenges = answers_challenges
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self.port = bound(lambda: self._listen(self.description, self.site))

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.port is None:  # started without the privileged step (tests)
            self.privilegedStartService()
        assert self.port is not None
        address = self.port.getHost()
        where = f"{getattr(address, 'host', '')}:{getattr(address, 'port', '')}"
        if self._answers_challenges:
            log.info(
                "Answering ACME HTTP-01 challenges at http://{where}/ "
                "(and redirecting the rest to HTTPS)",
                where=where,
            )
        else:
            log.info("Redirecting plain HTTP at http://{where}/ to HTTPS", where=where)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
