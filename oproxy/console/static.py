"""
The console's packaged scripts and style sheet, served from memory.

Only the files listed here exist: a name is looked up, never joined to a
path.  Their URLs carry a digest of their content (``?v=``), so a browser
may keep them for a day and still never runs an old script with a new
page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from oproxy.api.scope import Scope
from oproxy.errors import NotFound

#: The files, and what they are.
FILES = {
    "console.css": b"text/css; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "charts.js": b"text/javascript; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: bytes
    version: str


_ASSETS: dict[str, Asset] = {}


def asset(name: str) -> Asset | None:
    """A packaged file, read once."""
    if name not in FILES:
        return None
    found = _ASSETS.get(name)
    if found is None:
        body = resources.files("oproxy.console").joinpath("static", name).read_bytes()
        version = hashlib.sha256(body).hexdigest()[:12]
        found = _ASSETS[name] = Asset(body, FILES[name], version)
    return found


def asset_url(name: str) -> str:
    found = asset(name)
    version = found.version if found is not None else "0"
    return f"/ui/static/{name}?v={version}"


async def serve(scope: Scope) -> bytes | None:
    """``GET /ui/static/<name>``."""
    found = asset(scope.params["name"])
    if found is None:
        raise NotFound(f"No console file {scope.params['name']!r}.")
    request = scope.request
    request.setHeader(b"content-type", found.content_type)
    request.setHeader(b"cache-control", b"public, max-age=86400")
    request.setHeader(b"etag", f'"{found.version}"'.encode("ascii"))
    return found.body
