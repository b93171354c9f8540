"""
Keys, permissions, rate limits and quotas through the proxy, with the
embedded SQLite store in a temporary directory.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task

from oproxy.config import APIKey, AuthConfig, StateConfig
from oproxy.errors import QuotaExceeded, RateLimited
from oproxy.metrics import Metrics
from oproxy.security.guard import Guard
from oproxy.security.keys import hash_key
from oproxy.security.limits import Caller, periods
from oproxy.security.policy import KeyPolicy, Limits, policy_to_json
from oproxy.security.records import new_key
from oproxy.state.sqlite import SQLiteStore
from tests.conftest import Proxy
from tests.httputil import header, post_json, raw_post

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Say hi"}]}


def read_all(directory: Path, pattern: str) -> bytes:
    """Every byte of the store's files (the database, its WAL, its index)."""
    return b"".join(p.read_bytes() for p in directory.glob(pattern))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def key(name: str, secret: str, **policy: Any) -> APIKey:
    return APIKey(name=name, sha256=hash_key(secret), policy=KeyPolicy(**policy))


@pytest.fixture
def guarded(proxy_factory: Any, tmp_path: Path) -> Any:
    """A proxy with the given keys, sharing one state file per test."""

    def start(*keys: APIKey, **auth: Any) -> Proxy:
        started: Proxy = proxy_factory(
            auth=AuthConfig(keys=keys, **auth),
            state=StateConfig(path=str(tmp_path / "state.db")),
        )
        return started

    return start


async def chat(proxy: Proxy, token: str | None, body: Any = None) -> tuple[Any, Any]:
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        body or CHAT,
        bearer(token) if token else None,
    )
    return response, orjson.loads(raw) if raw else None


@pytest_twisted.ensureDeferred
async def test_without_keys_any_token_is_fine(guarded: Any) -> None:
    proxy = guarded()
    for token in (None, "ollama", "sk-oproxy-abcdefghijkl-" + "a" * 43):
        response, _ = await chat(proxy, token)
        assert response.code == 200
    assert header(response, "x-ratelimit-limit-requests") is None


@pytest_twisted.ensureDeferred
async def test_config_keys(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"))
    response, body = await chat(proxy, None)
    assert response.code == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in body["error"]["message"]
    response, body = await chat(proxy, "sk-wrong")
    assert (response.code, body["error"]["code"]) == (401, "invalid_api_key")
    assert body["error"]["type"] == "invalid_request_error"
    response, _ = await chat(proxy, "sk-alice")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_anonymous_callers_next_to_keys(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"), anonymous=True)
    assert (await chat(proxy, None))[0].code == 200
    assert (await chat(proxy, "sk-wrong"))[0].code == 401  # a wrong key is still wrong
    assert (await chat(proxy, "sk-alice"))[0].code == 200


@pytest_twisted.ensureDeferred
async def test_stored_keys_revocation_expiry_rotation(guarded: Any) -> None:
    proxy = guarded(require_keys=True)
    store = proxy.app.guard.store
    now = reactor.seconds()
    issued, record = new_key("bob", KeyPolicy(), now)
    await store.add_key(record)
    response, _ = await chat(proxy, issued.token)
    assert response.code == 200
    # The right id with the wrong secret.
    response, body = await chat(
        proxy, issued.token[:-1] + ("b" if issued.token[-1] == "a" else "a")
    )
    assert (response.code, body["error"]["code"]) == (401, "invalid_api_key")

    expiring, record = new_key("carol", KeyPolicy(expires=now - 1), now)
    await store.add_key(record)
    response, body = await chat(proxy, expiring.token)
    assert response.code == 401 and "expired" in body["error"]["message"]

    await store.save_key(replace((await store.get_key(issued.key_id)), revoked=now))
    response, body = await chat(proxy, issued.token)
    assert response.code == 401 and "revoked" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_models_and_networks(guarded: Any) -> None:
    proxy = guarded(
        key("narrow", "sk-narrow", models=("llama3*",)),
        key("remote", "sk-remote", networks=(ipaddress.ip_network("10.0.0.0/8"),)),
    )
    assert (await chat(proxy, "sk-narrow"))[0].code == 200
    response, body = await chat(proxy, "sk-narrow", {**CHAT, "model": "qwen3"})
    assert response.code == 403
    assert (body["error"]["code"], body["error"]["param"]) == ("model_not_allowed", "model")
    listed = await proxy.client.get(proxy.v1("models"), headers=bearer("sk-narrow"))
    ids = [m["id"] for m in orjson.loads(await treq.content(listed))["data"]]
    assert ids and all(i.startswith("llama3") for i in ids)
    hidden = await proxy.client.get(proxy.v1("models/qwen3:latest"), headers=bearer("sk-narrow"))
    assert hidden.code == 404
    await treq.content(hidden)
    response, body = await chat(proxy, "sk-remote")
    assert (response.code, body["error"]["code"]) == (403, "ip_not_allowed")


@pytest_twisted.ensureDeferred
async def test_requests_per_minute(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(rpm=3)))
    remaining = []
    for _ in range(3):
        response, _ = await chat(proxy, "sk-alice")
        assert response.code == 200
        remaining.append(header(response, "x-ratelimit-remaining-requests"))
        assert header(response, "x-ratelimit-limit-requests") == "3"
        assert header(response, "ratelimit-policy") == '"requests";q=3;w=60'
    assert remaining == ["2", "1", "0"]
    response, body = await chat(proxy, "sk-alice")
    assert response.code == 429
    assert (body["error"]["type"], body["error"]["code"]) == ("requests", "rate_limit_exceeded")
    assert 1 <= int(header(response, "retry-after") or 0) <= 20
    assert float(header(response, "retry-after-ms") or 0) > 0
    assert header(response, "x-ratelimit-remaining-requests") == "0"


@pytest_twisted.ensureDeferred
async def test_tokens_are_reserved_then_settled(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(tpm=10_000)))
    response, body = await chat(proxy, "sk-alice", {**CHAT, "max_tokens": 1000})
    assert response.code == 200
    # The first answer saw its own estimate taken: at least the 1000 asked for.
    assert int(header(response, "x-ratelimit-remaining-tokens") or 0) <= 9000
    used = body["usage"]["total_tokens"]
    response, _ = await chat(proxy, "sk-alice", {**CHAT, "max_tokens": 1})
    second_estimate = 1 + 4  # max_tokens plus the tiny prompt's share
    remaining = int(header(response, "x-ratelimit-remaining-tokens") or 0)
    # The reservation was settled to the real usage; refill only adds.
    assert 10_000 - used - second_estimate - 2 <= remaining <= 10_000
    assert remaining > 9000
    response, body = await chat(proxy, "sk-alice", {**CHAT, "max_tokens": 20_000})
    assert response.code == 429
    assert body["error"]["type"] == "tokens"
    assert header(response, "x-should-retry") == "false"


@pytest_twisted.ensureDeferred
async def test_parallel_requests(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(max_parallel=1)))
    slow = defer.Deferred.fromCoroutine(
        chat(proxy, "sk-alice", {**CHAT, "model": "slow", "max_tokens": 8})
    )
    while proxy.fake.stats.in_flight == 0:
        await task.deferLater(reactor, 0.01)
    response, body = await chat(proxy, "sk-alice")
    assert response.code == 429 and "parallel" in body["error"]["message"]
    assert header(response, "retry-after") == "1"
    assert (await slow)[0].code == 200
    assert (await chat(proxy, "sk-alice"))[0].code == 200


@pytest_twisted.ensureDeferred
async def test_anonymous_callers_are_limited_per_address(guarded: Any) -> None:
    proxy = guarded(anonymous_limits=Limits(rpm=2))
    codes = [(await chat(proxy, None))[0].code for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest_twisted.ensureDeferred
async def test_an_abandoned_stream_is_still_counted(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(daily_tokens=1_000_000)))
    client = await raw_post(
        proxy.url,
        "/v1/chat/completions",
        {**CHAT, "model": "slow", "stream": True, "max_tokens": 500},
        bearer("sk-alice"),
    )
    while client.received.count(b"data: ") < 5:
        await task.deferLater(reactor, 0.01)
    client.transport.loseConnection()
    while proxy.fake.stats.aborted == 0:
        await task.deferLater(reactor, 0.01)
    await task.deferLater(reactor, 0.05)
    day = periods(reactor.seconds())[0]
    used = await proxy.app.guard.store.quota_used(f"cfg:alice:day:{day}")
    generated = client.received.count(b'"content"')
    # The estimate (500 + prompt) was settled to prompt + what was generated.
    assert 4 + generated - 2 <= used <= 4 + generated + 10
    assert used < 500


# -- several generations in one request ----------------------------------------------


async def complete(proxy: Proxy, token: str, **body: Any) -> tuple[Any, Any]:
    response, raw = await post_json(
        proxy.client,
        proxy.v1("completions"),
        {"model": "llama3.2", "prompt": "Say hi", **body},
        bearer(token),
    )
    return response, orjson.loads(raw) if raw else None


@pytest_twisted.ensureDeferred
async def test_each_generation_counts_as_a_request(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(rpm=5)))
    response, body = await complete(proxy, "sk-alice", prompt=["a", "b"], n=2)
    assert response.code == 200 and len(body["choices"]) == 4
    assert header(response, "x-ratelimit-remaining-requests") == "1"
    # Two more generations do not fit in the one left: refused whole, before
    # anything runs, and nothing is charged.
    response, body = await chat(proxy, "sk-alice", {**CHAT, "n": 2})
    assert response.code == 429
    assert (body["error"]["type"], body["error"]["code"]) == ("requests", "rate_limit_exceeded")
    assert "Requested 2" in body["error"]["message"]
    assert len(proxy.fake.stats.requests) == 4
    response, _ = await chat(proxy, "sk-alice")
    assert response.code == 200
    assert header(response, "x-ratelimit-remaining-requests") == "0"


@pytest_twisted.ensureDeferred
async def test_more_generations_than_the_limit_can_never_pass(guarded: Any) -> None:
    proxy = guarded(
        key(
            "alice",
            "sk-alice",
            limits=Limits(rpm=100),
            model_limits=(("llama3*", Limits(rpm=3)),),
        )
    )
    response, body = await chat(proxy, "sk-alice", {**CHAT, "n": 4})
    assert response.code == 429
    assert header(response, "x-should-retry") == "false"
    assert "Limit 3, Requested 4" in body["error"]["message"]
    assert "fewer choices (n)" in body["error"]["message"]
    assert proxy.fake.stats.requests == []
    assert (await chat(proxy, "sk-alice", {**CHAT, "n": 3}))[0].code == 200


@pytest_twisted.ensureDeferred
async def test_tokens_are_reserved_and_settled_for_every_choice(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(tpm=10_000, daily_tokens=10**6)))
    response, body = await chat(proxy, "sk-alice", {**CHAT, "max_tokens": 3000, "n": 4})
    assert response.code == 429 and body["error"]["type"] == "tokens"
    assert proxy.fake.stats.requests == []
    response, body = await chat(proxy, "sk-alice", {**CHAT, "max_tokens": 1000, "n": 3})
    assert response.code == 200
    # The estimate covered three generations, each 1000 and its prompt.
    assert int(header(response, "x-ratelimit-remaining-tokens") or 0) <= 10_000 - 3 * 1001
    bucket = f"cfg:alice:day:{periods(reactor.seconds())[0]}"
    used = body["usage"]["total_tokens"]
    await settled_to(proxy, bucket, used)
    _, single = await chat(proxy, "sk-alice", {**CHAT, "max_tokens": 1000})
    await settled_to(proxy, bucket, used + single["usage"]["total_tokens"])
    # Settled to the sum of the three generations' usage.
    assert used == 3 * single["usage"]["total_tokens"]


async def settled_to(proxy: Proxy, bucket: str, tokens: int) -> None:
    """Wait for the background settlement to bring a quota counter to ``tokens``."""
    for _ in range(250):
        if await proxy.app.guard.store.quota_used(bucket) == tokens:
            return
        await task.deferLater(reactor, 0.02)
    assert await proxy.app.guard.store.quota_used(bucket) == tokens


@pytest_twisted.ensureDeferred
async def test_an_abandoned_stream_of_several_choices_is_still_counted(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice", limits=Limits(daily_tokens=1_000_000)))
    client = await raw_post(
        proxy.url,
        "/v1/chat/completions",
        {**CHAT, "model": "slow", "stream": True, "max_tokens": 500, "n": 2},
        bearer("sk-alice"),
    )
    while client.received.count(b"data: ") < 8:
        await task.deferLater(reactor, 0.01)
    client.transport.loseConnection()
    while proxy.fake.stats.aborted < 2:
        await task.deferLater(reactor, 0.01)
    await task.deferLater(reactor, 0.05)
    day = periods(reactor.seconds())[0]
    used = await proxy.app.guard.store.quota_used(f"cfg:alice:day:{day}")
    generated = client.received.count(b'"content"')
    # The estimate (2 x (500 + prompt)) was settled to both prompts and what was generated.
    assert 2 * 4 + generated - 4 <= used <= 2 * 4 + generated + 20
    assert used < 500


@pytest_twisted.ensureDeferred
async def test_secrets_never_reach_the_store_or_the_log(guarded: Any, tmp_path: Path) -> None:
    proxy = guarded(require_keys=True)
    issued, record = new_key("dave", KeyPolicy(limits=Limits(rpm=100)), reactor.seconds())
    await proxy.app.guard.store.add_key(record)
    assert (await chat(proxy, issued.token))[0].code == 200
    stored = read_all(tmp_path, "state.db*")
    assert issued.secret.encode() not in stored
    assert issued.token.encode() not in stored


# -- the guard itself, on an injected clock ---------------------------------------


@pytest.fixture
def clocked(tmp_path: Path) -> Any:
    clock = task.Clock()
    store = SQLiteStore(str(tmp_path / "clocked.db"))
    guard = Guard(store, clock, Metrics(None), StateConfig())
    yield clock, guard
    pytest_twisted.blockon(store.close())


@pytest_twisted.ensureDeferred
async def test_daily_quota_resets_at_utc_midnight(clocked: Any) -> None:
    clock, guard = clocked
    day_start = 1_800_057_600.0  # 2027-01-16T00:00:00Z
    clock.advance(day_start + 86_400 - 30)
    caller = Caller("cfg:q", "q", KeyPolicy(limits=Limits(daily_tokens=100)))
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 40}
    ticket = await guard.admit(caller, "m", "chat", body, "r1")
    assert ticket is not None
    guard.settle(ticket, 120)  # more than the quota: the next one is refused
    with pytest.raises(QuotaExceeded):
        await guard.admit(caller, "m", "chat", body, "r2")
    clock.advance(30)  # midnight UTC: a new day, a new counter
    assert await guard.admit(caller, "m", "chat", body, "r3") is not None


@pytest_twisted.ensureDeferred
async def test_monthly_quota_resets_on_the_first(clocked: Any) -> None:
    clock, guard = clocked
    clock.advance(1_801_439_999.0)  # 2027-01-31T23:59:59Z
    caller = Caller("cfg:m", "m", KeyPolicy(limits=Limits(monthly_tokens=10)))
    ticket = await guard.admit(caller, None, "embeddings", {"input": "x" * 80}, "a")
    assert ticket is not None
    with pytest.raises(QuotaExceeded):
        await guard.admit(caller, None, "embeddings", {"input": "x"}, "b")
    clock.advance(1)
    assert await guard.admit(caller, None, "embeddings", {"input": "x"}, "c") is not None


@pytest_twisted.ensureDeferred
async def test_rate_limit_refills_on_the_clock(clocked: Any) -> None:
    clock, guard = clocked
    clock.advance(1_800_000_000)
    caller = Caller("cfg:r", "r", KeyPolicy(limits=Limits(rpm=2)))
    for request_id in ("a", "b"):
        assert await guard.admit(caller, "m", "chat", {}, request_id) is not None
    with pytest.raises(RateLimited) as refused:
        await guard.admit(caller, "m", "chat", {}, "c")
    assert refused.value.headers["retry-after"] == "30"
    clock.advance(30)
    assert await guard.admit(caller, "m", "chat", {}, "d") is not None


@pytest_twisted.ensureDeferred
async def test_leases_of_a_dead_process_lapse(clocked: Any, tmp_path: Path) -> None:
    clock, guard = clocked
    clock.advance(1_800_000_000)
    caller = Caller("cfg:p", "p", KeyPolicy(limits=Limits(max_parallel=1)))
    assert await guard.admit(caller, "m", "chat", {}, "held") is not None
    # Another process sharing the store (its own guard) finds the slot taken
    # until the first one's lease lapses: it never renewed (it "died").
    other = Guard(SQLiteStore(str(tmp_path / "clocked.db")), clock, Metrics(None), StateConfig())
    with pytest.raises(RateLimited):
        await other.admit(caller, "m", "chat", {}, "second")
    clock.advance(61)
    assert await other.admit(caller, "m", "chat", {}, "third") is not None
    await other.store.close()


def test_policy_json_is_what_the_store_keeps() -> None:
    assert policy_to_json(KeyPolicy(limits=Limits(rpm=5), admin=True)) == {
        "limits": {"rpm": 5},
        "admin": True,
    }


# -- when the store is down, and the admin API --------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_unreachable_store_fails_closed_or_open(proxy_factory: Any) -> None:
    from tests.redisserver import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    limited = (key("alice", "sk-alice", limits=Limits(rpm=100)),)
    closed = proxy_factory(
        auth=AuthConfig(keys=limited),
        state=StateConfig(backend="redis", url=dead, timeout=0.5),
    )
    response, body = await chat(closed, "sk-alice")
    assert (response.code, body["error"]["code"]) == (503, "state_store_unavailable")
    ready = await closed.client.get(f"{closed.url}/readyz")
    assert ready.code == 503
    assert orjson.loads(await treq.content(ready))["state_store_reachable"] is False
    health = await closed.client.get(f"{closed.url}/v1/health", headers=bearer("sk-alice"))
    report = orjson.loads(await treq.content(health))
    assert report["state_store"] == {"reachable": False, "on_unavailable": "closed"}
    scrape = (await treq.content(await closed.client.get(f"{closed.url}/metrics"))).decode()
    assert "oproxy_state_store_up 0.0" in scrape

    opened = proxy_factory(
        auth=AuthConfig(keys=limited),
        state=StateConfig(backend="redis", url=dead, timeout=0.5, on_unavailable="open"),
    )
    response, _ = await chat(opened, "sk-alice")
    assert response.code == 200
    assert header(response, "x-ratelimit-limit-requests") is None


@pytest_twisted.ensureDeferred
async def test_admin_keys_manage_keys_over_http(guarded: Any) -> None:
    proxy = guarded(key("root", "sk-root", admin=True), key("user", "sk-user"))
    url = f"{proxy.url}/admin/keys"
    refused = await proxy.client.get(url, headers=bearer("sk-user"))
    body = orjson.loads(await treq.content(refused))
    assert (refused.code, body["error"]["code"]) == (403, "admin_key_required")

    response, raw = await post_json(
        proxy.client,
        url,
        {"name": "ci", "models": ["llama3*"], "limits": {"rpm": 2}, "expires": "2099-01-01"},
        bearer("sk-root"),
    )
    assert response.code == 201
    made = orjson.loads(raw)
    assert made["key"].startswith("sk-oproxy-") and made["status"] == "active"
    codes = [(await chat(proxy, made["key"]))[0].code for _ in range(3)]
    assert codes == [200, 200, 429]

    listed = orjson.loads(
        await treq.content(await proxy.client.get(url, headers=bearer("sk-root")))
    )
    assert [k["name"] for k in listed["data"]] == ["ci"]
    assert "key" not in listed["data"][0]

    rotated = await proxy.client.post(f"{url}/{made['id']}/rotate", headers=bearer("sk-root"))
    new_key = orjson.loads(await treq.content(rotated))["key"]
    assert (await chat(proxy, made["key"]))[0].code == 401
    revoked = await proxy.client.delete(f"{url}/{made['id']}", headers=bearer("sk-root"))
    assert orjson.loads(await treq.content(revoked))["status"] == "revoked"
    response, body = await chat(proxy, new_key)
    assert response.code == 401 and "revoked" in body["error"]["message"]
    missing = await proxy.client.get(f"{url}/nosuchkeyxyz", headers=bearer("sk-root"))
    assert missing.code == 404
    await treq.content(missing)
    bad, raw = await post_json(
        proxy.client, url, {"name": "x", "limits": {"rpm": 0}}, bearer("sk-root")
    )
    assert bad.code == 400


# -- one credential per request -------------------------------------------------------


async def send(proxy: Proxy, path: str, headers: dict[str, list[str]]) -> tuple[int, Any]:
    """POST the chat request with headers that may repeat (a list of values each)."""
    response = await proxy.client.post(
        f"{proxy.url}{path}",
        data=orjson.dumps(CHAT),
        headers={"Content-Type": ["application/json"], **headers},
    )
    return response.code, orjson.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers_are_refused_in_either_order(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"))
    for pair in (["Bearer sk-alice", "Bearer sk-wrong"], ["Bearer sk-wrong", "Bearer sk-alice"]):
        code, body = await send(proxy, "/v1/chat/completions", {"Authorization": pair})
        assert code == 400, pair
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "multiple_credentials"
        assert "Only one credential header" in body["error"]["message"]
    # The same key twice is still two headers.
    code, _ = await send(
        proxy, "/v1/chat/completions", {"Authorization": ["Bearer sk-alice", "Bearer sk-alice"]}
    )
    assert code == 400
    # One header holding two values is one header, and not a key.
    code, body = await send(
        proxy, "/v1/chat/completions", {"Authorization": ["Bearer sk-alice, Bearer sk-wrong"]}
    )
    assert (code, body["error"]["code"]) == (401, "invalid_api_key")
    code, _ = await send(proxy, "/v1/chat/completions", {"Authorization": ["Bearer sk-alice"]})
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_two_x_api_key_headers_are_refused(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"))
    code, body = await send(
        proxy,
        "/v1/chat/completions",
        {"Authorization": ["Bearer sk-alice"], "x-api-key": ["sk-alice", "sk-other"]},
    )
    assert (code, body["error"]["code"]) == (400, "multiple_credentials")
    # One x-api-key beside the Authorization header is not read, and not refused.
    code, _ = await send(
        proxy,
        "/v1/chat/completions",
        {"Authorization": ["Bearer sk-alice"], "x-api-key": ["sk-whatever"]},
    )
    assert code == 200


MESSAGE = {"model": "llama3.2", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]}


async def send_message(proxy: Proxy, headers: dict[str, list[str]]) -> tuple[int, Any]:
    response = await proxy.client.post(
        f"{proxy.url}/v1/messages",
        data=orjson.dumps(MESSAGE),
        headers={"Content-Type": ["application/json"], **headers},
    )
    return response.code, orjson.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_anthropics_routes_take_the_key_as_x_api_key_or_bearer(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"))
    for headers in (
        {"x-api-key": ["sk-alice"]},
        {"Authorization": ["Bearer sk-alice"]},
        {"Authorization": ["Bearer sk-alice"], "x-api-key": ["sk-alice"]},
    ):
        code, body = await send_message(proxy, headers)
        assert (code, body["type"]) == (200, "message"), headers
    code, body = await send_message(proxy, {"x-api-key": ["sk-wrong"]})
    assert code == 401
    assert body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    code, body = await send_message(proxy, {})
    assert (code, body["error"]["type"]) == (401, "authentication_error")


@pytest_twisted.ensureDeferred
async def test_anthropics_routes_refuse_two_different_keys(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"), key("bob", "sk-bob"))
    for headers in (
        {"Authorization": ["Bearer sk-bob"], "x-api-key": ["sk-alice"]},
        {"Authorization": ["Bearer sk-alice"], "x-api-key": ["sk-wrong"]},
        {"x-api-key": ["sk-alice", "sk-alice"]},
        {"Authorization": ["Bearer sk-alice", "Bearer sk-alice"]},
    ):
        code, body = await send_message(proxy, headers)
        assert code == 400, headers
        assert body["error"]["type"] == "invalid_request_error"


@pytest_twisted.ensureDeferred
async def test_openais_routes_do_not_read_x_api_key(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"))
    code, body = await send(proxy, "/v1/chat/completions", {"x-api-key": ["sk-alice"]})
    assert (code, body["error"]["code"]) == (401, "invalid_api_key")
    code, body = await send(proxy, "/v1/responses", {"x-api-key": ["sk-alice"]})
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_native_routes_refuse_two_credentials_in_ollamas_shape(guarded: Any) -> None:
    proxy = guarded(key("alice", "sk-alice"))
    code, body = await send(
        proxy, "/api/chat", {"Authorization": ["Bearer sk-wrong", "Bearer sk-alice"]}
    )
    assert code == 400
    assert set(body) == {"error"} and "Only one credential header" in body["error"]


@pytest_twisted.ensureDeferred
async def test_two_credentials_are_refused_before_any_key_lookup(proxy_factory: Any) -> None:
    from tests.redisserver import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    proxy = proxy_factory(
        auth=AuthConfig(require_keys=True),
        state=StateConfig(backend="redis", url=dead, timeout=0.5),
    )
    token = "sk-oproxy-abcdefghijkl-" + "a" * 43
    code, body = await send(proxy, "/v1/chat/completions", {"Authorization": [f"Bearer {token}"]})
    assert (code, body["error"]["code"]) == (503, "state_store_unavailable")  # it was looked up
    code, body = await send(
        proxy, "/v1/chat/completions", {"Authorization": [f"Bearer {token}", f"Bearer {token}"]}
    )
    assert (code, body["error"]["code"]) == (400, "multiple_credentials")


# -- key names --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_admin_api_refuses_unreadable_key_names(guarded: Any) -> None:
    proxy = guarded(key("root", "sk-root", admin=True))
    url = f"{proxy.url}/admin/keys"
    for name in ("x\ny", "n" * 100_000, "", "two words", None):
        response, raw = await post_json(proxy.client, url, {"name": name}, bearer("sk-root"))
        error = orjson.loads(raw)["error"]
        assert response.code == 400, name
        assert (error["type"], error["param"]) == ("invalid_request_error", "name")
        assert "letters, digits" in error["message"]
    assert await proxy.app.guard.store.list_keys() == []
    response, _ = await post_json(proxy.client, url, {"name": "ci@build:1"}, bearer("sk-root"))
    assert response.code == 201


@pytest_twisted.ensureDeferred
async def test_keys_made_before_names_were_checked_still_work(guarded: Any) -> None:
    proxy = guarded(key("root", "sk-root", admin=True))
    odd = "old\nkey\x1b[31m " + "x" * 200
    issued, record = new_key("placeholder", KeyPolicy(), reactor.seconds())
    await proxy.app.guard.store.add_key(replace(record, name=odd))
    assert (await chat(proxy, issued.token))[0].code == 200
    url = f"{proxy.url}/admin/keys"
    listed = orjson.loads(
        await treq.content(await proxy.client.get(url, headers=bearer("sk-root")))
    )
    assert [k["name"] for k in listed["data"]] == [odd]
    shown = await proxy.client.get(f"{url}/{issued.key_id}", headers=bearer("sk-root"))
    assert orjson.loads(await treq.content(shown))["name"] == odd
    revoked = await proxy.client.delete(f"{url}/{issued.key_id}", headers=bearer("sk-root"))
    assert orjson.loads(await treq.content(revoked))["status"] == "revoked"
    assert (await chat(proxy, issued.token))[0].code == 401
