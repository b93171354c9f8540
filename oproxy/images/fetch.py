"""
A request's images made ready for Ollama: remote ones fetched through the
guard, formats Ollama cannot read converted, all within limits.

Fetching: each URL is parsed and its host resolved once
(:mod:`oproxy.fetch_guard`), every address is checked, and the connection
goes to the checked address, over TLS checked against the URL's host name
for ``https``.  Redirects are followed here, hop by hop, each hop checked
the same way, at most ``images.max_redirects`` of them.  One deadline
(``images.timeout``) covers an image's lookups, connections, redirects and
body; the body is capped at ``images.max_bytes``.  At most
``images.fetch_concurrency`` fetches of one request run at a time.

Every failed or refused fetch gives the client the same words: whether a
private address was refused, a port was closed, the server said 403 or sent
a web page, or the image was too large or too slow, it reads "could not be
fetched", so the proxy cannot be used to map a network.  The logs say what
happened, without the URL's query (it may carry tokens).  Only what the
client spelt (a malformed URL) and what a reachable server sent as an image
(an unsupported or corrupt format) are named.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHostnameResolver, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from oproxy.config import ImagesConfig
from oproxy.errors import InvalidRequest
from oproxy.fetch_guard import (
    Address,
    FetchPolicy,
    MalformedURL,
    RefusedAddress,
    Target,
    parse_url,
    redirect_target,
    resolve,
)
from oproxy.images import formats

log = Logger()

T = TypeVar("T")

_REDIRECTS: Final = frozenset((301, 302, 303, 307, 308))
_HEADERS: Final = Headers({b"accept": [b"image/*"], b"user-agent": [b"oproxy"]})
#: Conversions one process runs at a time: they are CPU-bound, and threads
#: beyond the cores only queue (leaving the pool's other threads to DNS).
_CONVERSIONS: Final = 2


class FetchFailed(Exception):
    """Why a fetch failed; for the logs only, never for the client."""


class TooLarge(FetchFailed):
    pass


def _fetch_failed(param: str, config: ImagesConfig) -> InvalidRequest:
    """The one message for every fetch that failed or was refused."""
    return InvalidRequest(
        f"The image at '{param}' could not be fetched. Images are fetched over http(s) "
        f"from public addresses, up to {config.max_bytes} bytes in {config.timeout:g} "
        "seconds; send the image as a base64 data URL instead.",
        param=param,
        code="invalid_image_url",
    )


def _malformed(param: str, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"The image URL at '{param}' is not valid: {reason}.",
        param=param,
        code="invalid_image_url",
    )


def unusable(param: str, problem: formats.UnusableImage) -> InvalidRequest:
    """The refusal for an image in a format the model cannot be given."""
    return InvalidRequest(
        f"The image at '{param}' {problem}", param=param, code="invalid_image_format"
    )


def too_many_images(count: int, config: ImagesConfig, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"The request carries {count} images; at most {config.max_per_request} are "
        "allowed per request (images.max_per_request).",
        param=param,
        code="too_many_images",
    )


# -- one connection, to the vetted address --------------------------------------------


class _QuietClientFactory(_HTTP11ClientFactory):
    """No log line for every connection opened and closed."""

    noisy = False


@implementer(IAgentEndpointFactory)
class _Pinned:
    """Endpoints to the address that was checked, whatever the URL says."""

    def __init__(
        self, reactor: Any, target: Target, address: Address, timeout: float, trust: Any
    ) -> None:
        self._reactor = reactor
        self._target = target
        self._address = address
        self._timeout = timeout
        self._trust = trust

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host, port = str(self._address), self._target.port
        endpoint: IStreamClientEndpoint
        if self._address.version == 4:
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        else:
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        if self._target.scheme == "https":
            from twisted.internet.ssl import optionsForClientTLS

            name = self._target.host_text.strip("[]")
            return wrapClientTLS(optionsForClientTLS(name, trustRoot=self._trust), endpoint)
        return endpoint


class _Body(Protocol):
    """A response body, whole, or a failure once it passes ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.done.errback(TooLarge(f"the body is over {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        if reason.check(ResponseDone, http.PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class _Discard(Protocol):
    """Closes a response whose body is not wanted (a redirect, an error)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


async def _read(response: IResponse, limit: int) -> bytes:
    if isinstance(response.length, int) and response.length > limit:
        response.deliverBody(_Discard())
        raise TooLarge(f"Content-Length {response.length} is over {limit} bytes")
    body = _Body(limit)
    response.deliverBody(body)
    return await body.done


# -- the service ---------------------------------------------------------------------


class Images:
    """
    Fetches and converts images for requests; one per process.

    :param reactor: connects, resolves, keeps time and runs threads.
    :param resolver: host names to addresses; the reactor's (the system's
        ``getaddrinfo``, ``/etc/hosts`` included) unless given.
    :param run_in_thread: runs a conversion off the reactor thread; the
        reactor's thread pool unless given.
    :param trust_root: the certificate authorities for ``https`` image
        URLs; the platform's unless given.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        resolver: IHostnameResolver | None = None,
        run_in_thread: Callable[..., defer.Deferred[Any]] | None = None,
        trust_root: Any = None,
    ) -> None:
        self._reactor = reactor
        self._trust_root = trust_root
        self.resolver: IHostnameResolver = resolver or reactor.nameResolver
        # Not kept alive: each fetch connects to an address checked for it.
        self._pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        self._pool._factory = _QuietClientFactory
        self._converting = defer.DeferredSemaphore(_CONVERSIONS)
        self._run_in_thread = run_in_thread or self._in_reactor_pool

    def _in_reactor_pool(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    async def _in_thread(self, f: Callable[..., T], *args: Any) -> T:
        result: T = await self._converting.run(self._run_in_thread, f, *args)
        return result

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, url: str, config: ImagesConfig) -> bytes:
        """
        The bytes at ``url``, fetched through the guard.

        :raises MalformedURL: for a URL that cannot be fetched as spelt.
        :raises FetchFailed: (or any other exception) when it was refused
            or failed; the caller tells the client no more than that.
        """
        target = parse_url(url)
        policy = FetchPolicy.from_entries(config.allow_hosts, open=config.allow_private_networks)
        fetching = defer.Deferred.fromCoroutine(self._follow(target, policy, config))
        fetching.addTimeout(config.timeout, self._reactor)
        return await fetching

    async def _follow(self, target: Target, policy: FetchPolicy, config: ImagesConfig) -> bytes:
        for _hop in range(config.max_redirects + 1):
            address = policy.check(target, await resolve(self.resolver, target))
            agent = Agent.usingEndpointFactory(
                self._reactor,
                _Pinned(self._reactor, target, address, config.timeout, self._trust_root),
                self._pool,
            )
            response = await agent.request(b"GET", target.url.encode("ascii"), _HEADERS)
            if response.code == 200:
                return await _read(response, config.max_bytes)
            location = response.headers.getRawHeaders(b"location")
            response.deliverBody(_Discard())
            if response.code not in _REDIRECTS or not location:
                raise FetchFailed(f"HTTP {response.code} from {target.for_logs}")
            try:
                target = redirect_target(target, location[0].decode("latin-1"))
            except MalformedURL as e:
                raise FetchFailed(f"a redirect to a malformed URL: {e}") from None
        raise FetchFailed(f"more than {config.max_redirects} redirects")

    async def _fetched(self, url: str, param: str, config: ImagesConfig) -> str:
        """One URL's image as base64, or the client's error."""
        try:
            data = await self.fetch(url, config)
        except MalformedURL as e:
            raise _malformed(param, str(e)) from None
        except defer.CancelledError:
            raise
        except Exception as e:
            _log_failure(url, e)
            raise _fetch_failed(param, config) from None
        kind = formats.sniff(data[: formats.SNIFF_BYTES])
        if kind is None or kind.action == "audio":
            # Not an image at all (a web page, JSON, nothing): saying so
            # would tell what answers at that address.
            _log_failure(url, FetchFailed(f"not an image ({len(data)} bytes)"))
            raise _fetch_failed(param, config)
        return await self._ready(data, param)

    async def _ready(self, data: bytes, param: str) -> str:
        """``data`` checked or converted for Ollama, as base64."""
        try:
            if formats.needs_conversion(data[: formats.SNIFF_BYTES]):
                converted = await self._in_thread(formats.for_ollama, data)
            else:
                converted = formats.for_ollama(data)
        except formats.UnusableImage as e:
            raise unusable(param, e) from None
        return base64.b64encode(converted if converted is not None else data).decode("ascii")

    # -- a chat request's images -------------------------------------------------

    async def prepare(
        self, parts: Sequence[tuple[str, str]], config: ImagesConfig
    ) -> dict[str, str]:
        """
        Base64 images, by URL, for a chat request's ``image_url`` parts
        (``(url, param)`` pairs): every http(s) URL fetched, and the data
        URLs whose format is converted, converted (off the reactor thread).
        Data URLs passed on as is are left to the translation.

        :raises InvalidRequest: too many images, fetching disabled, any
            image that failed; the first failure cancels the other fetches.
        """
        if len(parts) > config.max_per_request:
            raise too_many_images(len(parts), config, "messages")
        where: dict[str, str] = {}
        for url, param in parts:
            where.setdefault(url, param)
        remote = [url for url in where if _is_remote(url)]
        inline = [url for url in where if _data_url_needs_conversion(url)]
        if remote and not config.fetch_remote:
            raise InvalidRequest(
                "image URLs are not enabled on this server; send images as base64 data URLs",
                param=where[remote[0]],
            )
        ready: dict[str, str] = {}
        queue = iter(remote)

        async def fetcher() -> None:
            for url in queue:
                ready[url] = await self._fetched(url, where[url], config)

        async def converter() -> None:
            for url in inline:
                ready[url] = await self._converted_data_url(url, where[url])

        workers = [fetcher() for _ in range(min(config.fetch_concurrency, len(remote)))]
        if inline:
            workers.append(converter())
        await _all_or_nothing(workers)
        return ready

    async def _converted_data_url(self, url: str, param: str) -> str:
        data = _data_url_bytes(url)
        if data is None:  # not base64: the translation says so
            return ""
        return await self._ready(data, param)

    # -- Ollama's native bodies ---------------------------------------------------

    async def prepare_native(self, body: dict[str, Any], config: ImagesConfig) -> None:
        """
        The ``images`` of a native ``/api/chat`` or ``/api/generate`` body,
        capped in number, and converted in place where Ollama cannot read
        them.  Whatever is not recognisable base64 is left for Ollama to
        judge, as it would have without the proxy.
        """
        holders = _native_image_lists(body)
        count = sum(len(images) for images, _ in holders)
        if count > config.max_per_request:
            raise too_many_images(count, config, holders[0][1] if len(holders) == 1 else "messages")
        for images, param in holders:
            for index, image in enumerate(images):
                if not isinstance(image, str):
                    continue
                kind = formats.sniff(_base64_head(image))
                if kind is None or kind.action in ("pass", "audio"):
                    continue
                where = f"{param}.{index}"
                if kind.action == "refuse":
                    raise unusable(where, formats.unsupported(kind))
                data = _strict_base64(image)
                if data is not None:
                    images[index] = await self._ready(data, where)


async def _all_or_nothing(work: Sequence[Any]) -> None:
    """Run coroutines together; the first failure cancels the rest and is raised."""
    running = [defer.Deferred.fromCoroutine(w) for w in work]
    if not running:
        return
    try:
        await defer.gatherResults(running, consumeErrors=True)
    except defer.FirstError as e:
        for each in running:
            each.cancel()
        e.subFailure.raiseException()
    except defer.CancelledError:
        for each in running:
            each.cancel()
        raise


def _log_failure(url: str, error: Exception) -> None:
    try:
        shown = parse_url(url).for_logs
    except MalformedURL:
        shown = "(malformed URL)"
    if isinstance(error, defer.TimeoutError):
        reason = "timed out"
    elif isinstance(error, FetchFailed | RefusedAddress):
        reason = str(error)
    else:
        reason = f"{type(error).__name__}: {error}"
    log.info("Image not fetched from {url}: {reason}", url=shown, reason=reason)


# -- URLs and base64 ------------------------------------------------------------------

_DATA_PAYLOAD: Final = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)
_WHITESPACE: Final = re.compile(r"\s+")


def _is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def _base64_head(text: str) -> bytes:
    """The first bytes of base64 ``text``, enough to sniff; leniently."""
    chars = -(-formats.SNIFF_BYTES // 3) * 4
    head = _WHITESPACE.sub("", text[: chars * 2])[:chars]
    try:
        return binascii.a2b_base64(head + "=" * (-len(head) % 4))
    except binascii.Error:
        return b""


def _strict_base64(text: str) -> bytes | None:
    compact = _WHITESPACE.sub("", text)
    try:
        return binascii.a2b_base64(compact + "=" * (-len(compact) % 4), strict_mode=True)
    except binascii.Error:
        return None


def _data_url_payload(url: str) -> str | None:
    match = _DATA_PAYLOAD.match(url)
    return url[match.end() :] if match else None


def _data_url_needs_conversion(url: str) -> bool:
    payload = _data_url_payload(url)
    return payload is not None and formats.needs_conversion(_base64_head(payload))


def _data_url_bytes(url: str) -> bytes | None:
    payload = _data_url_payload(url)
    return _strict_base64(payload) if payload is not None else None


def _native_image_lists(body: Mapping[str, Any]) -> list[tuple[list[Any], str]]:
    """Each ``images`` array of a native body, with its param path."""
    found: list[tuple[list[Any], str]] = []
    images = body.get("images")
    if isinstance(images, list):
        found.append((images, "images"))
    messages = body.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            images = message.get("images") if isinstance(message, dict) else None
            if isinstance(images, list):
                found.append((images, f"messages.{index}.images"))
    return found
