"""
``POST /v1/embeddings`` through the proxy, against the fake Ollama.
"""

from __future__ import annotations

import array
import base64
import math
import sys
from typing import Any

import orjson
import pytest_twisted

from tests.conftest import Proxy
from tests.httputil import post_json
from tests.openai_schema import assert_valid


async def embed(proxy: Proxy, **body: Any) -> tuple[Any, Any]:
    body.setdefault("model", "all-minilm")
    response, raw = await post_json(proxy.client, proxy.v1("embeddings"), body)
    return response, orjson.loads(raw)


def decode_le_float32(text: str) -> list[float]:
    values = array.array("f", base64.b64decode(text))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


@pytest_twisted.ensureDeferred
async def test_float_embeddings(proxy: Proxy) -> None:
    response, body = await embed(proxy, input=["hello world", "goodbye"])
    assert response.code == 200
    assert_valid("CreateEmbeddingResponse", body)
    assert [d["index"] for d in body["data"]] == [0, 1]
    vector = body["data"][0]["embedding"]
    assert len(vector) == 384
    assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-4)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["model"] == "all-minilm"


@pytest_twisted.ensureDeferred
async def test_base64_is_little_endian_float32_of_the_same_vector(proxy: Proxy) -> None:
    _, floats = await embed(proxy, input="hello world")
    _, encoded = await embed(proxy, input="hello world", encoding_format="base64")
    assert_valid("CreateEmbeddingResponseBase64", encoded)
    decoded = decode_le_float32(encoded["data"][0]["embedding"])
    expected = floats["data"][0]["embedding"]
    assert len(decoded) == len(expected)
    pairs = zip(decoded, expected, strict=True)
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in pairs)


@pytest_twisted.ensureDeferred
async def test_dimensions(proxy: Proxy) -> None:
    _, body = await embed(proxy, input="hello", dimensions=64)
    sent = [b for p, b in proxy.fake.stats.requests if p == "/api/embed"][-1]
    assert sent["dimensions"] == 64
    assert len(body["data"][0]["embedding"]) == 64


@pytest_twisted.ensureDeferred
async def test_bad_encoding_format(proxy: Proxy) -> None:
    response, body = await embed(proxy, input="x", encoding_format="json")
    assert response.code == 400
    assert body["error"]["param"] == "encoding_format"


@pytest_twisted.ensureDeferred
async def test_missing_input(proxy: Proxy) -> None:
    response, body = await embed(proxy)
    assert response.code == 400
    assert body["error"]["param"] == "input"
