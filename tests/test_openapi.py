"""
``/openapi.json`` and ``/docs``: a valid document for every route, and
Swagger UI served from packaged files.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest_twisted
import treq
from openapi_spec_validator import validate

from oproxy.openapi import openapi_document
from oproxy.web.routes import ROUTES
from tests.conftest import Proxy

#: Routes that are not API operations: the UI and the root banner.
UNDOCUMENTED = {"/", "/docs", "/docs/"}


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_route_is_documented() -> None:
    routes = {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route.path.replace("<path:model_id>", "{model}"))
        for route in ROUTES
    }
    documented = set(openapi_document()["paths"])
    assert routes - UNDOCUMENTED == documented


@pytest_twisted.ensureDeferred
async def test_served_document_and_ui(proxy: Proxy) -> None:
    response = await proxy.client.get(f"{proxy.url}/openapi.json")
    assert response.code == 200
    assert orjson.loads(await treq.content(response)) == openapi_document()
    response = await proxy.client.get(f"{proxy.url}/docs")
    page = await treq.content(response)
    assert response.code == 200
    assert b"/docs/swagger-ui-bundle.js" in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "oproxy-init.js"):
        response = await proxy.client.get(f"{proxy.url}/docs/{asset}")
        body: Any = await treq.content(response)
        assert response.code == 200, asset
        assert len(body) > 100 or asset == "oproxy-init.js"
    response = await proxy.client.get(f"{proxy.url}/docs/oproxy-init.js")
    assert b"/openapi.json" in await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_missing_asset_is_a_json_404(proxy: Proxy) -> None:
    response = await proxy.client.get(f"{proxy.url}/docs/no-such-file.js")
    assert response.code == 404
    assert orjson.loads(await treq.content(response))["error"]["code"] == "not_found"
