"""
A request's JSON body, read once, or a clear ``400``, ``413`` or ``415``.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.web.iweb import IRequest

from oproxy.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

#: Ollama's own documentation posts with ``curl -d``, which says it sends a form.
_FORM = b"application/x-www-form-urlencoded"


def read_json(request: IRequest) -> dict[str, Any]:
    """
    The request body as a JSON object.

    :raises RequestTooLarge: the site kept no body, as it was over the cap.
    :raises InvalidRequest: an empty body, or one that is not a JSON object.
    :raises UnsupportedMediaType: see :func:`require_json_media_type`.
    """
    if getattr(request, "body_too_large", False):
        limit = getattr(request, "max_body_bytes", 0)
        raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    content = request.content
    raw = content.read() if content is not None else b""
    if not raw.strip():
        raise InvalidRequest(
            "We could not parse the JSON body of your request: the body is empty.",
            code="invalid_json",
        )
    require_json_media_type(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request. ({e})", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def _media_type(content_type: bytes) -> bytes:
    return content_type.split(b";", 1)[0].strip().lower()


def require_json_media_type(request: IRequest) -> None:
    """
    Refuse a body that does not say it is JSON, with ``415``.

    A web page may make a browser send a form (``text/plain``, URL-encoded
    or multipart) to any site without asking it first; only a JSON
    ``Content-Type`` makes the browser ask (CORS), and oproxy answers no
    such question.  Were form bodies parsed as JSON, any page its users
    visit could drive a proxy that has no keys.  So JSON routes take
    ``application/json`` and ``+json`` types (with parameters), and
    otherwise only what no page can send:

    * no ``Content-Type`` at all, from a client that is not a browser (no
      ``Origin`` header: a browser sends one with every cross-site
      ``POST``), as scripts posting a JSON string without a header do;
    * on Ollama's native routes, URL-encoded bodies from such a client too,
      because ``curl -d`` sends that and is how Ollama's users call them.
    """
    content_type = request.getHeader(b"content-type")
    media_type = _media_type(content_type) if content_type is not None else None
    if media_type is not None and (
        media_type == b"application/json" or (media_type.endswith(b"+json") and b"/" in media_type)
    ):
        return
    from_a_page = request.getHeader(b"origin") is not None
    if not from_a_page and (
        media_type is None or (media_type == _FORM and request.path.startswith(b"/api/"))
    ):
        return
    sent = "none" if media_type is None else f"`{media_type.decode('latin-1')}`"
    raise UnsupportedMediaType(
        f"Unsupported Content-Type {sent}: this route takes a JSON body, "
        "sent with `Content-Type: application/json`."
    )
