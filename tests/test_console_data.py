"""
What the console's JSON says and does: the dashboard and requests from the
access log and the metrics, models (pull with progress, delete, load,
unload), keys, and the configuration editor (validate, apply, and every
way an apply is refused without losing anything).
"""

from __future__ import annotations

import orjson
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.server import Site

from oproxy.console.access import console_of
from oproxy.console.editor import MAX_BYTES, _locked
from oproxy.security.policy import KeyPolicy, Limits
from oproxy.security.records import create_key
from oproxy.testing.lmstudio import FakeLMStudio
from tests.conftest import listen
from tests.console_helpers import (
    ADMIN_KEY,
    USER_KEY,
    Console,
    console_factory,  # noqa: F401 (a fixture)
)


def ndjson(body: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in body.splitlines() if line.strip()]


# -- the dashboard and the requests page ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_dashboard_counts_what_was_served(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    first = (await console.request("GET", "/ui/api/dashboard")).json()
    assert first["access_log"]["configured"] is True
    assert len(first["minutes"]) == 60
    for _ in range(3):
        assert (await console.chat()).code == 200
    assert (await console.chat(model="no-such-model")).code == 404
    data = (await console.request("GET", "/ui/api/dashboard")).json()
    hour = data["hour"]["total"]
    assert hour["requests"] == first["hour"]["total"]["requests"] + 4
    assert hour["client_errors"] >= 1
    assert hour["completion_tokens"] > 0
    assert hour["latency_p50"] is not None
    assert data["minutes"][-1]["requests"] >= 4
    by_model = {row["name"]: row for row in data["hour"]["by_model"]}
    assert by_model["llama3.2"]["requests"] == 3
    assert {row["name"] for row in data["hour"]["by_key"]} >= {"user"}
    assert data["hour"]["by_backend"][0]["name"] == "local"
    # Since the start: the metrics'.
    start = data["since_start"]["total"]
    assert start["requests"] >= 4 and start["prompt_tokens"] > 0
    assert any(row["name"] == "user" for row in data["since_start"]["by_key"])
    assert data["backends"][0]["name"] == "local"
    recent = data["recent"]
    assert recent[0]["status"] == 404 and recent[1]["model"] == "llama3.2"
    # The console's own requests are not traffic.
    assert all(not row["path"].startswith("/ui/") for row in recent)


@pytest_twisted.ensureDeferred
async def test_without_an_access_log_the_dashboard_says_how(console_factory, tmp_path) -> None:  # noqa: F811
    console: Console = console_factory()
    text = console.config_path.read_text()
    no_log = text[: text.index("access_log:")]
    console = console_factory(text=no_log)
    await console.sign_in()
    await console.chat()
    data = (await console.request("GET", "/ui/api/dashboard")).json()
    assert data["access_log"]["configured"] is False
    assert "access_log" in data["access_log"]["advice"]
    assert data["hour"] is None and data["minutes"] == []
    assert data["since_start"]["total"]["requests"] >= 1


@pytest_twisted.ensureDeferred
async def test_requests_filter_and_open_a_record(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    ok = await console.chat()
    await console.chat(model="qwen3", key=ADMIN_KEY)
    await console.chat(model="nonexistent")
    everything = (await console.request("GET", "/ui/api/requests")).json()
    assert len(everything["data"]) == 3
    assert everything["keys"] == ["boss", "user"]
    assert "qwen3" in everything["models"]
    only = (await console.request("GET", "/ui/api/requests?status=4xx")).json()["data"]
    assert [row["status"] for row in only] == [404]
    only = (await console.request("GET", "/ui/api/requests?key=boss")).json()["data"]
    assert [row["model"] for row in only] == ["qwen3"]
    only = (await console.request("GET", "/ui/api/requests?model=llama3.2&status=200")).json()
    assert len(only["data"]) == 1
    request_id = ok.header("X-Request-Id")
    record = await console.request("GET", f"/ui/api/requests/{request_id}")
    assert record.json()["request_id"] == request_id
    assert "request_body" not in record.json()  # bodies are not logged
    page = await console.request("GET", f"/ui/requests/{request_id}")
    assert page.code == 200 and b"Bodies are not logged" in page.body
    missing = await console.request("GET", "/ui/api/requests/req_nothing")
    assert missing.code == 404


@pytest_twisted.ensureDeferred
async def test_bodies_show_when_they_are_logged(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    text = console.config_path.read_text() + "  bodies: true\n"
    console = console_factory(text=text)
    await console.sign_in()
    ok = await console.chat()
    request_id = ok.header("X-Request-Id")
    record = (await console.request("GET", f"/ui/api/requests/{request_id}")).json()
    assert "messages" in record["request_body"]
    page = await console.request("GET", f"/ui/requests/{request_id}")
    assert b"Request body" in page.body and b"messages" in page.body


# -- models -------------------------------------------------------------------------------


async def _listed(console: Console, backend: str = "local") -> dict[str, dict[str, object]]:
    data = (await console.request("GET", "/ui/api/models")).json()
    return {model["name"]: model for model in data["models"] if model["backend"] == backend}


@pytest_twisted.ensureDeferred
async def test_models_lists_every_model_with_its_details(console_factory) -> None:  # noqa: F811
    console: Console = console_factory('models:\n  team-default:\n    target: "llama3.2"\n')
    await console.sign_in()
    await console.chat()
    data = (await console.request("GET", "/ui/api/models")).json()
    assert data["backends"] == [
        {"name": "local", "kind": "ollama", "can_pull": True, "can_load": True, "error": None}
    ]
    models = {model["name"]: model for model in data["models"]}
    llama = models["llama3.2:latest"]
    assert llama["family"] == "llama" and llama["quantization"] == "Q4_K_M"
    assert llama["parameter_size"] == "3.2B" and llama["size"] > 0
    assert llama["loaded"] is True and llama["aliases"] == ["team-default"]
    assert models["qwen3:latest"]["loaded"] is False
    assert data["rules"][0]["name"] == "team-default"


@pytest_twisted.ensureDeferred
async def test_pull_streams_progress_then_the_model_is_there(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    answer = await console.request(
        "POST", "/ui/api/models/pull", json={"model": "tinyllama:1b", "backend": "local"}
    )
    assert answer.code == 200
    assert answer.header("Content-Type") == "application/x-ndjson"
    lines = ndjson(answer.body)
    assert lines[0]["status"] == "pulling manifest"
    percentages = [line["percent"] for line in lines if "percent" in line]
    assert 0 < min(p for p in percentages if p > 0) < 100
    assert lines[-1] == {**lines[-1], "status": "success", "done": True, "percent": 100.0}
    assert lines[-2]["all_total"] > 0
    assert "tinyllama:1b" in await _listed(console)
    # Routing sees it at once.
    assert (await console.chat(model="tinyllama:1b")).code == 200


@pytest_twisted.ensureDeferred
async def test_pulling_a_missing_model_says_so(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    answer = await console.request("POST", "/ui/api/models/pull", json={"model": "nonexistent-x"})
    assert answer.code == 200
    last = ndjson(answer.body)[-1]
    assert last["done"] is True
    assert "does not exist" in str(last["error"]) and "nonexistent-x" in str(last["error"])
    for bad in ({"model": ""}, {"model": "two words"}, {}, {"model": "x", "backend": "nope"}):
        answer = await console.request("POST", "/ui/api/models/pull", json=bad)
        assert answer.code == 400, bad


@pytest_twisted.ensureDeferred
async def test_delete_load_and_unload(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    body = {"model": "qwen3:latest", "backend": "local"}
    assert (await console.request("POST", "/ui/api/models/load", json=body)).code == 200
    assert (await _listed(console))["qwen3:latest"]["loaded"] is True
    assert (await console.request("POST", "/ui/api/models/unload", json=body)).code == 200
    assert (await _listed(console))["qwen3:latest"]["loaded"] is False
    answer = await console.request("POST", "/ui/api/models/delete", json=body)
    assert answer.code == 200
    assert "qwen3:latest" not in await _listed(console)
    answer = await console.request("POST", "/ui/api/models/delete", json=body)
    assert answer.code == 404
    assert (await console.chat(model="qwen3")).code == 404


@pytest_twisted.ensureDeferred
async def test_every_kind_of_backend_shows_its_models_and_loads_where_it_can(
    console_factory,  # noqa: F811
) -> None:
    lmstudio = FakeLMStudio(reactor, loaded=["qwen2.5-7b-instruct"])
    running = listen(Site(lmstudio.resource()))
    try:
        console: Console = console_factory()
        text = console.config_path.read_text().replace(
            "auth:",
            f'  - name: studio\n    type: lmstudio\n    url: "{running.url}"\nauth:',
            1,
        )
        console = console_factory(text=text)
        await console.sign_in()
        data = (await console.request("GET", "/ui/api/models")).json()
        kinds = {b["name"]: (b["kind"], b["can_load"], b["can_pull"]) for b in data["backends"]}
        assert kinds == {"local": ("ollama", True, True), "studio": ("lmstudio", True, False)}
        studio = {m["name"]: m for m in data["models"] if m["backend"] == "studio"}
        vision = studio["qwen2-vl-2b-instruct"]
        assert (vision["type"], vision["quantization"], vision["parameter_size"]) == (
            "vlm",
            "4bit",
            "2B",
        )
        assert studio["qwen2.5-7b-instruct"]["loaded"] is True
        assert studio["llama-3.2-3b-instruct"]["loaded"] is False
        assert studio["llama-3.2-3b-instruct"]["context_length"] == 131072
        assert not studio["llama-3.2-3b-instruct"]["can_delete"]
        # Loading goes through LM Studio's own API, as /admin/models/load does.
        body = {"model": "llama-3.2-3b-instruct", "backend": "studio"}
        answer = await console.request("POST", "/ui/api/models/load", json=body)
        assert answer.code == 200, answer.body
        assert answer.json()["backends"] == ["studio"]
        assert lmstudio.loads == 1
        assert (await _listed(console, "studio"))["llama-3.2-3b-instruct"]["loaded"] is True
        # The dashboard names the kind too.
        dashboard = (await console.request("GET", "/ui/api/dashboard")).json()
        assert {b["name"]: b["kind"] for b in dashboard["backends"]} == {
            "local": "ollama",
            "studio": "lmstudio",
        }
    finally:
        await running.port.stopListening()


# -- keys -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keys_show_usage_against_quotas(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    store = console.app.guard.store
    limits = Limits(daily_tokens=100_000, monthly_tokens=1_000_000)
    issued, record = await create_key(store, "metered", KeyPolicy(limits=limits), 0.0)
    await console.app.guard.refresh()
    assert (await console.chat(key=issued.token)).code == 200
    rows = {
        row["name"]: row for row in (await console.request("GET", "/ui/api/keys")).json()["data"]
    }
    assert rows["boss"]["source"] == "file" and rows["boss"]["policy"]["admin"] is True
    metered = rows["metered"]
    assert metered["id"] == record.key_id and metered["source"] == "store"
    usage = metered["usage"]
    assert usage["daily_quota"] == 100_000 and usage["monthly_quota"] == 1_000_000
    assert 0 < usage["today"] <= usage["this_month"]
    assert metered["last_used"] is not None
    assert rows["user"]["usage"]["daily_quota"] is None


@pytest_twisted.ensureDeferred
async def test_keys_are_made_revoked_and_rotated_as_with_oproxy_keys(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    made = await console.request(
        "POST",
        "/ui/api/keys",
        json={"name": "made-here", "limits": {"rpm": 5}, "models": ["llama*"]},
    )
    assert made.code == 201
    token, key_id = made.json()["key"], made.json()["id"]
    assert (await console.chat(key=token)).code == 200
    assert (await console.chat(model="qwen3", key=token)).code == 403
    rotated = await console.request("POST", f"/ui/api/keys/{key_id}/rotate", json={})
    assert rotated.code == 200
    assert (await console.chat(key=token)).code == 401
    token = rotated.json()["key"]
    assert (await console.chat(key=token)).code == 200
    revoked = await console.request("POST", f"/ui/api/keys/{key_id}/revoke", json={})
    assert revoked.json()["status"] == "revoked"
    assert (await console.chat(key=token)).code == 401
    taken = await console.request("POST", "/ui/api/keys", json={"name": "made-here"})
    assert taken.code == 400
    bad = await console.request("POST", "/ui/api/keys", json={"name": "has space"})
    assert bad.code == 400


# -- the configuration -------------------------------------------------------------------------


async def _editor(console: Console) -> dict[str, object]:
    answer = await console.request("GET", "/ui/api/config")
    assert answer.code == 200
    data: dict[str, object] = answer.json()
    return data


@pytest_twisted.ensureDeferred
async def test_the_file_is_shown_with_its_secrets_masked(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    shown = await _editor(console)
    text = str(shown["text"])
    assert ADMIN_KEY not in text and USER_KEY not in text
    assert '"[masked:0]"' in text and '"[masked:1]"' in text
    assert "# A console test's configuration." in text  # comments kept
    assert shown["writable"] is True and shown["note"] is None
    page = await console.request("GET", "/ui/configuration")
    assert ADMIN_KEY.encode() not in page.body
    assert b"[masked:0]" in page.body


@pytest_twisted.ensureDeferred
async def test_validate_reports_problems_on_their_lines(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    shown = await _editor(console)
    text, base = str(shown["text"]), shown["digest"]
    ok = await console.request("POST", "/ui/api/config/validate", json={"text": text, "base": base})
    assert ok.json() == {"valid": True, "problems": [], "notes": []}
    broken = text.replace("    type: ollama\n", "    type: ollama\n    weight: lots\n")
    answer = await console.request(
        "POST", "/ui/api/config/validate", json={"text": broken, "base": base}
    )
    (problem,) = answer.json()["problems"]
    assert problem["key"] == "backends[0].weight"
    assert problem["line"] == broken.splitlines().index("    weight: lots") + 1
    answer = await console.request(
        "POST", "/ui/api/config/validate", json={"text": "backends: [", "base": base}
    )
    (problem,) = answer.json()["problems"]
    assert problem["line"] == 1 and "YAML" in problem["message"]
    restart = text.replace("backends:", "workers: 3\nbackends:")
    answer = await console.request(
        "POST", "/ui/api/config/validate", json={"text": restart, "base": base}
    )
    assert answer.json()["valid"] is True
    assert "next restart" in answer.json()["notes"][0]


@pytest_twisted.ensureDeferred
async def test_apply_writes_keeps_a_backup_and_reloads(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    before = console.config_path.read_text()
    shown = await _editor(console)
    text = str(shown["text"]) + "models:\n  console-alias:\n    target: llama3.2\n"
    answer = await console.request(
        "POST", "/ui/api/config/apply", json={"text": text, "base": shown["digest"]}
    )
    assert answer.code == 200, answer.body
    result = answer.json()
    assert result["applied"] is True and result["reloaded"] is True
    assert console.reloads == [True]
    written = console.config_path.read_text()
    assert "console-alias" in written
    assert ADMIN_KEY in written and "[masked:" not in written  # the masked secrets kept
    assert console.config_path.with_name("oproxy.yaml.bak").read_text() == before
    assert result["backup"] == str(console.config_path) + ".bak"
    models = await console.request("GET", "/v1/models", bearer=USER_KEY, cookie="")
    assert "console-alias" in [m["id"] for m in models.json()["data"]]
    assert (await _editor(console))["digest"] == result["digest"]
    # The old version is gone: applying over it again is refused.
    again = await console.request(
        "POST", "/ui/api/config/apply", json={"text": text, "base": shown["digest"]}
    )
    assert again.code == 409
    assert again.json()["error"]["code"] == "configuration_changed"


@pytest_twisted.ensureDeferred
async def test_a_secret_typed_over_its_mask_replaces_it(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    shown = await _editor(console)
    text = str(shown["text"]).replace('"[masked:1]"', '"sk-user-new-secret-value"')
    answer = await console.request(
        "POST", "/ui/api/config/apply", json={"text": text, "base": shown["digest"]}
    )
    assert answer.code == 200
    assert (await console.chat(key="sk-user-new-secret-value")).code == 200
    assert (await console.chat(key=USER_KEY)).code == 401
    unknown = str((await _editor(console))["text"]).replace('"[masked:0]"', '"[masked:9]"')
    answer = await console.request(
        "POST",
        "/ui/api/config/apply",
        json={"text": unknown, "base": (await _editor(console))["digest"]},
    )
    assert answer.code == 400
    assert answer.json()["error"]["code"] == "unknown_masked_value"


@pytest_twisted.ensureDeferred
async def test_an_invalid_file_changes_nothing(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    before = console.config_path.read_bytes()
    shown = await _editor(console)
    text = str(shown["text"]) + "bogus_setting: 1\n"
    answer = await console.request(
        "POST", "/ui/api/config/apply", json={"text": text, "base": shown["digest"]}
    )
    assert answer.code == 400
    body = answer.json()
    assert body["error"]["code"] == "invalid_configuration"
    (problem,) = body["problems"]
    assert problem["line"] == text.count("\n") and problem["key"] == "bogus_setting"
    assert console.config_path.read_bytes() == before
    assert not console.config_path.with_name("oproxy.yaml.bak").exists()
    assert console.reloads == []
    assert (await console.chat()).code == 200


@pytest_twisted.ensureDeferred
async def test_a_huge_or_binary_paste_is_refused(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    before = console.config_path.read_bytes()
    shown = await _editor(console)
    huge = str(shown["text"]) + "#" + "x" * MAX_BYTES + "\n"
    for action in ("validate", "apply"):
        answer = await console.request(
            "POST", f"/ui/api/config/{action}", json={"text": huge, "base": shown["digest"]}
        )
        assert answer.code == 413
        assert "at most" in answer.json()["error"]["message"]
    binary = "\x7fELF\x02\x01\x01\x00" + "\x00" * 64
    answer = await console.request(
        "POST", "/ui/api/config/apply", json={"text": binary, "base": shown["digest"]}
    )
    assert answer.code == 400
    assert answer.json()["error"]["code"] == "not_text"
    raw = await console.client.request(
        "POST",
        console.url + "/ui/api/config/apply",
        headers={
            "Cookie": [f"oproxy_console={console.cookie}"],
            "X-CSRF-Token": [console.csrf or ""],
            "Content-Type": ["application/json"],
        },
        data=b'{"text": "\xff\xfe not utf-8", "base": "x"}',
    )
    assert raw.code == 400
    assert console.config_path.read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_two_applies_at_once(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    shown = await _editor(console)
    console_parts = console_of(console.app.services)
    # Another apply holds the lock (in this worker or another): a clear refusal.
    with _locked(console_parts.lock_path):
        text = str(shown["text"]) + "# mine\n"
        answer = await console.request(
            "POST", "/ui/api/config/apply", json={"text": text, "base": shown["digest"]}
        )
    assert answer.code == 409
    assert answer.json()["error"]["code"] == "apply_in_progress"
    # Two editors that loaded the same version: one wins, the other is told.
    first, second = await defer.gatherResults(
        [
            defer.Deferred.fromCoroutine(
                console.request(
                    "POST",
                    "/ui/api/config/apply",
                    json={"text": str(shown["text"]) + f"# editor {n}\n", "base": shown["digest"]},
                )
            )
            for n in (1, 2)
        ]
    )
    codes = sorted([first.code, second.code])
    assert codes == [200, 409]
    winner = 1 if first.code == 200 else 2
    assert console.config_path.read_text().endswith(f"# editor {winner}\n")
    loser = second if winner == 1 else first
    assert loser.json()["error"]["code"] in ("apply_in_progress", "configuration_changed")


@pytest_twisted.ensureDeferred
async def test_without_a_file_the_editor_is_read_only(console_factory) -> None:  # noqa: F811
    console: Console = console_factory(with_file=False)
    await console.sign_in()
    shown = await _editor(console)
    assert shown["writable"] is False and "embedded defaults" in str(shown["note"])
    answer = await console.request("POST", "/ui/api/config/apply", json={"text": "", "base": ""})
    assert answer.code == 403
    page = await console.request("GET", "/ui/configuration")
    assert b"embedded defaults" in page.body
    assert b'data-writable="false"' in page.body
