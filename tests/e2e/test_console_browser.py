"""
The admin console in a real headless Chromium, against a real ``twistd -n
oproxy`` with two workers and the fake Ollama, driven by the labels a user
reads: sign in (an ordinary key refused), numbers that move after traffic,
a pull followed to its end, a delete, a key created, used and revoked, an
alias added in the editor and served by every worker, a broken file
refused while the API keeps serving, the requests page.

The tests run in order over one signed-in page, as a person would use the
console; each takes the screenshot ``docs/console.rst`` shows.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.browser import Screenshots, browser  # noqa: F401 (a fixture)
from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (or fails under CI)
    expect = None

ADMIN_KEY = "sk-console-admin-7Hq2Lw9Zr4Kd"
APP_KEY = "sk-console-app-3Vt8Np1Xc6Jm"
#: Seconds an expectation may take: the VM is slow, never the console.
PATIENCE_MS = 30_000


@pytest.fixture(scope="module")
def slow_fake(workdir: Path) -> Iterator[Daemon]:
    """The fake Ollama, pulling slowly enough for progress to be seen."""
    port = free_port()
    daemon = start_twistd(
        [
            "oproxy-fake-ollama",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--token-delay",
            "0.05",
        ],
        port,
        workdir,
        "console-fake-ollama",
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def config_file(workdir: Path) -> Path:
    return workdir / "console.yaml"


def history(path: Path, now: float) -> None:
    """
    The access log of the hour before the daemon starts, as its workers
    would have written it: the console reads the last hour of it at once,
    and the screenshots show an hour of traffic.  No ``qwen3`` in it: the
    tests count that model's requests.
    """
    rng = random.Random(5)
    lines = []
    for minute in range(56, 1, -1):
        busy = 14 + 10 * math.sin(minute / 9.0) + rng.randint(0, 6)
        for _ in range(int(busy)):
            ended = now - minute * 60 + rng.uniform(0, 60)
            latency = round(rng.lognormvariate(-0.7, 0.5), 4)
            status = rng.choices((200, 429, 502), (96, 3, 1))[0]
            answered = status == 200
            lines.append(
                {
                    "time": ended - latency,
                    "request_id": f"req_{rng.getrandbits(128):032x}",
                    "key": rng.choice(("search-team", "search-team", "notebooks", "ci")),
                    "client": "10.0.0.7",
                    "method": "POST",
                    "path": "/v1/chat/completions",
                    "model": rng.choice(("llama3.2", "llama3.2", "mistral-small", "phi4-mini"))
                    if answered
                    else "-",
                    "backend": "local" if answered else "-",
                    "status": status,
                    "latency_seconds": latency,
                    "first_token_seconds": round(latency * 0.15, 4) if answered else None,
                    "prompt_tokens": rng.randint(40, 600) if answered else None,
                    "completion_tokens": rng.randint(20, 300) if answered else None,
                    "cache": None,
                    "error": None if answered else "rate_limit_exceeded",
                }
            )
    lines.sort(key=lambda line: line["time"] + line["latency_seconds"])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def daemon(workdir: Path, slow_fake: Daemon, config_file: Path) -> Iterator[Daemon]:
    port = free_port()
    history(workdir / "access.jsonl", time.time())
    config_file.write_text(
        f"""\
# The console's end-to-end tests.
listen: ["tcp:{port}:interface=127.0.0.1"]
workers: 2
backends:
  - {{name: local, type: ollama, url: "{slow_fake.url}"}}
auth:
  keys:
    - {{name: console-admin, key: "{ADMIN_KEY}", admin: true}}
    - {{name: app, key: "{APP_KEY}"}}
access_log:
  path: "{workdir / "access.jsonl"}"
"""
    )
    running = start_twistd(["oproxy", "--config", str(config_file)], port, workdir, "console")
    wait_for(lambda: _status(running, "/readyz") == 200, 30)
    yield running
    running.stop()


def _status(daemon: Daemon, path: str, key: str | None = None) -> int:
    request = urllib.request.Request(daemon.url + path)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _models(daemon: Daemon, key: str) -> list[str]:
    """``/v1/models`` over a connection of its own (so either worker may answer)."""
    request = urllib.request.Request(daemon.url + "/v1/models")
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Connection", "close")
    with urllib.request.urlopen(request, timeout=10) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def _client(daemon: Daemon, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def shots(workdir: Path) -> Screenshots:
    directory = workdir / "screenshots"
    directory.mkdir(exist_ok=True)
    return Screenshots(directory)


@pytest.fixture(scope="module")
def page(browser: Any, daemon: Daemon) -> Iterator[Any]:  # noqa: F811
    """One tab, kept across the module's tests, as a person keeps theirs."""
    context = browser.new_context(
        viewport={"width": 1360, "height": 900},
        base_url=daemon.url,
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(PATIENCE_MS)
    expect.set_options(timeout=PATIENCE_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))

    def console_message(message: Any) -> None:
        # A refused sign-in is a 401 or 403 page: the browser notes it.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    tab.on("console", console_message)
    yield tab
    context.close()
    # No script error and no CSP violation on any page.
    assert errors == []


def _sign_in(page: Any, key: str) -> None:
    page.get_by_label("Admin key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_console_needs_an_admin_key(page: Any, daemon: Daemon, shots: Screenshots) -> None:
    page.goto("/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shots.take(page, "console-sign-in", full_page=False)

    _sign_in(page, APP_KEY)
    expect(page.get_by_role("alert")).to_contain_text("not an admin key")
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    expect(page.get_by_role("link", name="Models")).to_have_count(0)

    _sign_in(page, "sk-not-a-key-at-all")
    expect(page.get_by_role("alert")).to_contain_text("Incorrect API key")
    # Nothing of the console's data answers without a session.
    assert page.request.get("/ui/api/dashboard").status == 401


def test_dashboard_moves_with_traffic(page: Any, daemon: Daemon, shots: Screenshots) -> None:
    _sign_in(page, ADMIN_KEY)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    requests = page.get_by_role("region", name="Requests", exact=True).locator(".value")
    expect(page.get_by_text("Updated")).to_be_visible()
    expect(page.locator("#notice")).to_be_hidden()  # the access log is read
    expect(requests).not_to_have_text("\u2013")  # an en dash: no figure yet
    before = int(requests.inner_text().replace(",", ""))

    client = _client(daemon, APP_KEY)
    for n in range(4):
        client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": f"hello {n}"}]
        )
    stream = client.chat.completions.create(
        model="qwen3", messages=[{"role": "user", "content": "stream please"}], stream=True
    )
    for _ in stream:
        pass
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[])

    # Counted from the shared access log: the same whichever worker answers.
    expect(requests).to_have_text(str(before + 6))
    recent = page.get_by_role("region", name="Recent requests")
    expect(recent.get_by_role("cell", name="qwen3").first).to_be_visible()
    tokens_out = page.get_by_role("region", name="Tokens out", exact=True).locator(".value")
    expect(tokens_out).not_to_have_text("0")
    expect(page.get_by_role("region", name="Backends", exact=True)).to_contain_text("Up")
    shots.take(page, "console-dashboard")


def test_pull_a_model_and_delete_it(page: Any, daemon: Daemon, shots: Screenshots) -> None:
    page.get_by_role("link", name="Models").click()
    expect(page.get_by_role("heading", name="Models", level=1)).to_be_visible()
    table = page.locator("#models-table")
    expect(table.get_by_role("row").filter(has_text="llama3.2:latest")).to_have_count(1)

    page.get_by_label("Model", exact=True).fill("tinyllama:1b")
    # Note every percentage the page shows on the way.
    page.evaluate(
        """() => {
            const shown = document.getElementById("pull-percent");
            window.percentages = [];
            new MutationObserver(() => window.percentages.push(shown.textContent))
                .observe(shown, {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.get_by_role("button", name="Pull").click()
    status = page.locator("#pull-status")
    expect(status).to_contain_text("success")
    expect(page.locator("#pull-percent")).to_have_text("100%")
    expect(page.get_by_label("Pull progress")).to_have_attribute("value", "100")
    # The progress was followed live, not only its end.
    shown = page.evaluate("window.percentages")
    assert any(p not in ("0%", "100%") for p in shown), shown
    row = table.get_by_role("row").filter(has_text="tinyllama:1b")
    expect(row).to_have_count(1)
    shots.take(page, "console-models")

    page.get_by_label("Model", exact=True).fill("nonexistent-model")
    page.get_by_role("button", name="Pull").click()
    expect(page.locator("#pull-error")).to_contain_text("does not exist")

    row.get_by_role("button", name="Delete", exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("tinyllama:1b")
    dialog.get_by_role("button", name="Delete", exact=True).click()
    expect(row).to_have_count(0)


def test_create_use_and_revoke_a_key(page: Any, daemon: Daemon, shots: Screenshots) -> None:
    page.get_by_role("link", name="Keys").click()
    expect(page.get_by_role("heading", name="Keys", level=1)).to_be_visible()
    page.get_by_label("Name", exact=True).fill("browser-made")
    page.get_by_label("Requests per minute").fill("120")
    page.get_by_role("button", name="Create").click()
    secret = page.get_by_label("New key", exact=True)
    expect(secret).to_have_value(re.compile(r"^sk-oproxy-"))
    token = secret.input_value()
    row = page.locator("#keys-table").get_by_role("row").filter(has_text="browser-made")
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("120 req/min")
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-status")).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == token
    shots.take(page, "console-keys")

    models = _client(daemon, token).models.list()
    assert any(model.id.startswith("llama3.2") for model in models.data)

    row.get_by_role("button", name="Revoke", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke", exact=True).click()
    expect(row).to_contain_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        _client(daemon, token).models.list()


def test_add_an_alias_and_apply_it(
    page: Any, daemon: Daemon, config_file: Path, shots: Screenshots
) -> None:
    page.get_by_role("link", name="Configuration").click()
    editor = page.get_by_label("Configuration", exact=True)
    expect(editor).to_have_value(re.compile("console-admin"))
    text = editor.input_value()
    assert ADMIN_KEY not in text and APP_KEY not in text  # masked
    assert '"[masked:0]"' in text

    editor.fill(text + "models:\n  console-alias:\n    target: llama3.2\n")
    page.get_by_role("button", name="Validate").click()
    result = page.locator("#config-result")
    expect(result).to_contain_text("The configuration is valid.")
    page.get_by_role("button", name="Apply").click()
    expect(result).to_contain_text("Applied")
    expect(result).to_contain_text(".bak")
    shots.take(page, "console-configuration")

    written = config_file.read_text()
    assert "console-alias" in written
    assert ADMIN_KEY in written and "[masked:" not in written  # the secrets kept
    assert Path(str(config_file) + ".bak").read_text() != written

    # Every worker serves the alias: ask over fresh connections.
    def everywhere() -> bool:
        return all("console-alias" in _models(daemon, APP_KEY) for _ in range(8))

    wait_for(everywhere, 30)
    # The editor shows the new version, masked again.
    expect(editor).to_have_value(re.compile("console-alias"))
    assert ADMIN_KEY not in editor.input_value()


def test_a_broken_file_is_refused(
    page: Any, daemon: Daemon, config_file: Path, shots: Screenshots
) -> None:
    before = config_file.read_bytes()
    editor = page.get_by_label("Configuration", exact=True)
    editor.fill(editor.input_value() + "bogus_setting: 1\n")
    page.get_by_role("button", name="Apply").click()
    result = page.locator("#config-result")
    expect(result).to_contain_text("not valid")
    expect(result).to_contain_text("bogus_setting: is not a known setting")
    line = before.decode().count("\n") + 1
    expect(result).to_contain_text(f"Line {line}:")
    shots.take(page, "console-configuration-refused")

    assert config_file.read_bytes() == before
    assert "console-alias" in _models(daemon, APP_KEY)  # still serving


def test_requests_page_filters_and_opens_a_record(
    page: Any, daemon: Daemon, shots: Screenshots
) -> None:
    page.get_by_role("link", name="Requests").click()
    table = page.locator("#requests-table")
    expect(table.get_by_role("row").filter(has_text="qwen3").first).to_be_visible()
    page.get_by_label("Status").select_option("4xx")
    expect(table.locator("tbody td.status-2")).to_have_count(0)
    expect(table.get_by_role("cell", name="404", exact=True).first).to_be_visible()
    page.get_by_label("Status").select_option("")
    page.get_by_label("Model", exact=True).select_option("qwen3")
    expect(table.locator("tbody tr")).to_have_count(1)
    shots.take(page, "console-requests")

    link = table.get_by_role("link").first
    request_id = link.get_attribute("title")
    link.click()
    expect(page.get_by_role("heading", name=re.compile("Request"))).to_contain_text(request_id)
    expect(page.locator("dl.record")).to_contain_text("qwen3")
    expect(page.get_by_text("Bodies are not logged")).to_be_visible()


def test_sign_out(page: Any, daemon: Daemon) -> None:
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/ui/login"))
    page.goto("/ui/keys")
    expect(page).to_have_url(re.compile(r"/ui/login"))
