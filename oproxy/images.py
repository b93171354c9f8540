"""
Fetching ``http(s)`` image URLs on the client's behalf.

Ollama only takes inline base64 images and rejects URLs; OpenAI clients send
URLs all the time.  The proxy fetches them, with a size cap and a timeout,
and refuses private addresses unless told otherwise (a gateway that fetches
whatever it is given is a server-side request forgery waiting to happen).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

import treq
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from oproxy.config import ImagesConfig
from oproxy.errors import InvalidRequest
from oproxy.upstream import BodyReader, DeadlineExceeded, within


def _check_address(url: str, config: ImagesConfig) -> None:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequest(f"image URL {url!r} is not an http(s) URL", param="messages")
    if config.allow_private_networks:
        return
    private = host == "localhost" or host.endswith((".localhost", ".local", ".internal"))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        private = not address.is_global
    if private:
        raise InvalidRequest(
            f"image URL {url!r} points to a private address; "
            "set images.allow_private_networks to allow it",
            param="messages",
        )


async def fetch_image(
    url: str, *, client: treq.client.HTTPClient, clock: IReactorTime, config: ImagesConfig
) -> str:
    """
    Download one image and return it as bare base64, as Ollama wants it.
    """
    _check_address(url, config)
    request = client.get(url, headers=Headers({"Accept": ["image/*"]}), unbuffered=True)
    try:
        response = await within(request, config.timeout, clock)
        if response.code != 200:
            raise InvalidRequest(
                f"could not fetch image URL {url!r}: HTTP {response.code}", param="messages"
            )
        length = response.length
        if isinstance(length, int) and length > config.max_bytes:
            raise InvalidRequest(
                f"image at {url!r} is larger than {config.max_bytes} bytes", param="messages"
            )
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if content_type and not content_type.lower().startswith(b"image/"):
            raise InvalidRequest(
                f"URL {url!r} is not an image ({content_type.decode('latin-1')})",
                param="messages",
            )
        reader = BodyReader(clock, config.timeout, url, config.max_bytes, split_lines=False)
        response.deliverBody(reader)
        data = await within(defer.Deferred.fromCoroutine(reader.read_all()), config.timeout, clock)
    except InvalidRequest:
        raise
    except defer.CancelledError:
        raise
    except DeadlineExceeded:
        raise InvalidRequest(
            f"timed out fetching image URL {url!r} after {config.timeout:g} seconds",
            param="messages",
        ) from None
    except Exception as e:
        raise InvalidRequest(f"could not fetch image URL {url!r}: {e}", param="messages") from None
    if not data:
        raise InvalidRequest(f"image URL {url!r} returned no data", param="messages")
    return base64.b64encode(data).decode("ascii")


async def fetch_images(
    urls: Sequence[str],
    *,
    client: treq.client.HTTPClient,
    clock: IReactorTime,
    config: ImagesConfig,
) -> dict[str, str]:
    """
    Fetch every URL concurrently; any failure fails the request.
    """
    if not urls:
        return {}
    if not config.fetch_remote:
        raise InvalidRequest(
            "image URLs are not enabled on this server; send images as base64 data URLs",
            param="messages",
        )
    fetches = [
        defer.Deferred.fromCoroutine(fetch_image(u, client=client, clock=clock, config=config))
        for u in urls
    ]
    try:
        images = await defer.gatherResults(fetches, consumeErrors=True)
    except defer.FirstError as e:
        for fetch in fetches:
            fetch.cancel()
        e.subFailure.raiseException()
        raise
    return dict(zip(urls, images, strict=True))
