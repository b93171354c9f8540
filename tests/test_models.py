"""
``GET /v1/models`` and ``GET /v1/models/{id}``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted
import treq

from tests.conftest import Proxy
from tests.openai_schema import assert_valid


async def get(proxy: Proxy, path: str) -> tuple[int, Any]:
    response = await proxy.client.get(proxy.v1(path))
    return response.code, orjson.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_list(proxy: Proxy) -> None:
    code, body = await get(proxy, "models")
    assert code == 200
    assert_valid("ListModelsResponse", body)
    ids = [m["id"] for m in body["data"]]
    assert "llama3.2:latest" in ids and "all-minilm:latest" in ids
    assert all(m["owned_by"] == "local" for m in body["data"])


@pytest_twisted.ensureDeferred
async def test_empty_list_is_an_empty_array(proxy: Proxy) -> None:
    proxy.fake.models.clear()
    code, body = await get(proxy, "models")
    assert code == 200
    assert body == {"object": "list", "data": []}


@pytest.mark.parametrize("model_id", ["llama3.2", "llama3.2:latest"])
@pytest_twisted.ensureDeferred
async def test_retrieve(proxy: Proxy, model_id: str) -> None:
    code, body = await get(proxy, f"models/{model_id}")
    assert code == 200
    assert_valid("Model", body)
    assert body["id"] == model_id
    assert body["owned_by"] == "local"


@pytest.mark.parametrize(
    "path", ["models/hf.co/acme/tiny:Q4_K_M", "models/hf.co%2Facme%2Ftiny:Q4_K_M"]
)
@pytest_twisted.ensureDeferred
async def test_retrieve_ids_with_slashes(proxy: Proxy, path: str) -> None:
    pull = await proxy.client.post(
        f"{proxy.fake_url}/api/pull",
        data=orjson.dumps({"model": "hf.co/acme/tiny:Q4_K_M", "stream": False}),
    )
    assert pull.code == 200, await treq.content(pull)
    code, body = await get(proxy, path)
    assert code == 200, body
    assert body["id"] == "hf.co/acme/tiny:Q4_K_M"


@pytest_twisted.ensureDeferred
async def test_retrieve_unknown(proxy: Proxy) -> None:
    code, body = await get(proxy, "models/nope")
    assert code == 404
    assert body["error"]["code"] == "model_not_found"
