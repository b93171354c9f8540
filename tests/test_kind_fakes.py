"""
The kinds' fakes answer as their servers do (the exact shapes a proxy or
client must cope with), and run as processes; the pure pieces the kinds
share: request shaping and reading Prometheus gauges.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import task
from twisted.web.server import Site

from oproxy.backends.prometheus import gauge_sums
from oproxy.backends.shaping import max_tokens_only, tgi_response_format, without
from oproxy.errors import InvalidRequest
from oproxy.testing.huggingface import FakeHuggingFaceRouter
from oproxy.testing.llamacpp import FakeLlamaCpp
from oproxy.testing.lmstudio import FakeLMStudio
from oproxy.testing.tei import FakeTEI
from oproxy.testing.tgi import FakeTGI
from oproxy.testing.vllm import FakeVLLM
from tests.conftest import listen

# --------------------------------------------------------------------------
# Shaping and gauges


def test_max_completion_tokens_becomes_max_tokens() -> None:
    assert max_tokens_only({"max_completion_tokens": 5}) == {"max_tokens": 5}
    both = {"max_tokens": 100, "max_completion_tokens": 5, "model": "m"}
    assert max_tokens_only(both) == {"max_tokens": 5, "model": "m"}
    untouched = {"max_tokens": 7}
    assert max_tokens_only(untouched) is untouched
    assert max_tokens_only({"max_completion_tokens": None}) == {}
    assert without({"a": 1, "b": 2}, "b") == {"a": 1}


def test_tgi_response_formats() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    given = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}
    assert tgi_response_format(given) == {
        "type": "json_schema",
        "value": {"name": "c", "schema": schema},
    }
    assert tgi_response_format({"type": "json_object"}) == {
        "type": "json",
        "value": {"type": "object"},
    }
    assert tgi_response_format({"type": "text"}) is None
    own = {"type": "regex", "value": "[a-z]+"}
    assert tgi_response_format(own) == own
    for bad in ({"type": "yaml"}, "json", {"type": "json_schema", "json_schema": {}}):
        with pytest.raises(InvalidRequest):
            tgi_response_format(bad)


def test_gauge_sums() -> None:
    text = (
        b"# HELP vllm:num_requests_running Number of requests.\n"
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        b'vllm:num_requests_running{engine="1",model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{engine="0",model_name="a b}c"} 4.0 1700000000000\n'
        b"vllm:num_requests_waiting_total 99\n"
        b"llamacpp:requests_processing 1\n"
        b"tgi_queue_size NaN\n"
    )
    wanted = ("vllm:num_requests_running", "vllm:num_requests_waiting", "tgi_queue_size")
    assert gauge_sums(text, wanted) == {
        "vllm:num_requests_running": 5.0,
        "vllm:num_requests_waiting": 4.0,
    }
    assert gauge_sums(text, ["llamacpp:requests_processing"]) == {
        "llamacpp:requests_processing": 1.0
    }


# --------------------------------------------------------------------------
# The fakes' wire formats


async def get(fake: Any, path: str, method: bytes = b"GET", body: Any = None) -> tuple[int, bytes]:
    """One request to a fake on loopback: its status and body as they came."""
    running = listen(Site(fake.resource()))
    try:
        response = await treq.request(
            method.decode(),
            running.url + path,
            data=None if body is None else orjson.dumps(body),
            headers={"Content-Type": "application/json"},
            persistent=False,
        )
        return response.code, await treq.content(response)
    finally:
        await running.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_lmstudio_answers_an_unknown_route_with_200() -> None:
    status, body = await get(FakeLMStudio(task.Clock()), "/health")
    assert status == 200
    assert orjson.loads(body) == {"error": "Unexpected endpoint or method. (GET /health)"}


@pytest_twisted.ensureDeferred
async def test_llamacpp_answers_503_while_loading_but_lists_its_model() -> None:
    fake = FakeLlamaCpp(task.Clock(), loading=True)
    status, body = await get(fake, "/health")
    assert status == 503
    assert orjson.loads(body) == {
        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    }
    status, body = await get(fake, "/v1/models")
    assert status == 200
    assert orjson.loads(body)["data"][0]["meta"] is None
    fake.finish_loading()
    assert (await get(fake, "/health")) == (200, b'{"status":"ok"}')
    fake.slots_endpoint = False
    status, body = await get(fake, "/slots")
    assert (status, orjson.loads(body)["error"]["type"]) == (501, "not_supported_error")


@pytest_twisted.ensureDeferred
async def test_vllm_metrics_and_errors() -> None:
    fake = FakeVLLM(task.Clock())
    fake.waiting = 3
    status, body = await get(fake, "/metrics")
    assert status == 200
    assert (
        b'vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0' in body
    )
    status, body = await get(fake, "/v1/chat/completions", b"POST", {"model": "x", "messages": []})
    error = orjson.loads(body)["error"]
    assert status == 400 and error["type"] == "BadRequestError" and error["code"] == 400
    assert (await get(fake, "/nope")) == (404, b'{"detail":"Not Found"}')
    assert (await get(fake, "/health")) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_tgi_refuses_what_serde_cannot_read() -> None:
    fake = FakeTGI(task.Clock())
    body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 2}}
    status, raw = await get(fake, "/v1/chat/completions", b"POST", body)
    assert status == 422
    assert raw.startswith(b"Failed to deserialize the JSON body into the target type")
    fake.fail_next(424, "Request failed during generation")
    status, raw = await get(fake, "/v1/chat/completions", b"POST", {**body, "logit_bias": None})
    assert (status, orjson.loads(raw)) == (
        424,
        {"error": "Request failed during generation", "error_type": "generation"},
    )
    status, raw = await get(fake, "/v1/chat/completions", b"POST", {**body, "logit_bias": None})
    assert status == 200 and orjson.loads(raw)["id"] == ""


@pytest_twisted.ensureDeferred
async def test_tei_errors() -> None:
    fake = FakeTEI(task.Clock(), max_client_batch_size=2)
    status, raw = await get(fake, "/v1/embeddings", b"POST", {"input": ["a", "b", "c"]})
    assert (status, orjson.loads(raw)) == (
        422,
        {
            "message": "batch size 3 > maximum allowed batch size 2",
            "code": 422,
            "type": "Validation",
        },
    )
    status, raw = await get(fake, "/embed", b"POST", {"inputs": []})
    assert (status, orjson.loads(raw)) == (
        400,
        {"error": "`inputs` cannot be empty", "error_type": "Empty"},
    )
    status, raw = await get(fake, "/embed", b"POST", {"inputs": "hello"})
    assert status == 200 and len(orjson.loads(raw)[0]) == 8


@pytest_twisted.ensureDeferred
async def test_huggingface_router_needs_its_token_and_knows_providers() -> None:
    fake = FakeHuggingFaceRouter(task.Clock(), token="hf_t")
    status, _ = await get(fake, "/v1/models")
    assert status == 401
    fake.api_key = None
    status, raw = await get(fake, "/v1/models")
    llama = orjson.loads(raw)["data"][0]
    assert [p["provider"] for p in llama["providers"]] == ["novita", "together"]
    assert llama["providers"][0]["status"] == "live"


# --------------------------------------------------------------------------
# As processes


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("lmstudio", "/api/v0/models"),
        ("llamacpp", "/props"),
        ("vllm", "/version"),
        ("tgi", "/info"),
        ("tei", "/info"),
        ("huggingface", "/v1/models"),
    ],
)
def test_each_fake_runs_as_a_process(kind: str, path: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", f"oproxy.testing.{kind}", "--port", "0", "--api-key", "hf_k"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        request = urllib.request.Request(url + path, headers={"Authorization": "Bearer hf_k"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
            json.loads(answer.read())
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_each_fake_is_a_twistd_plugin() -> None:
    from oproxy import service_makers

    for kind in ("lmstudio", "llamacpp", "vllm", "tgi", "tei", "huggingface"):
        makers = [m for m in vars(service_makers).values() if hasattr(m, "tapname")]
        (maker,) = [m for m in makers if m.tapname == f"oproxy-fake-{kind}"]
        assert maker.module == f"oproxy.testing.{kind}.tap"
        tap = __import__(maker.module, fromlist=["Options"])
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--api-key", "k"])
        assert tap.makeService(options) is not None
