"""
Plugins in the real daemon (a master and two workers, in front of the fake
Ollama), driven by the official ``openai`` and ``ollama`` clients:

* every hook: requests changed and refused, answers and streamed chunks
  changed (personal data redacted across chunk boundaries), records of
  finished requests delivered to a webhook receiver that fails first;
* plugin failures and timeouts, refusing or passed over as ``on_error`` says
  (a dropped-in plugin, ``tests/e2e/dropins/``, fails on request);
* the tutorial's plugin (``docs/examples/oproxy-footer``) built and
  installed with ``pip install --target``, as ``docs/plugins.rst`` says;
* reloads that add and remove plugins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

ROOT = Path(__file__).resolve().parents[2]
DROP_INS = Path(__file__).resolve().parent / "dropins"
TUTORIAL = ROOT / "docs" / "examples" / "oproxy-footer"

KEYS = {
    "plain": "sk-e2e-plain",
    "strict": "sk-e2e-strict",
    "lenient": "sk-e2e-lenient",
    "capped": "sk-e2e-capped",
    "viewer": "sk-e2e-viewer",
    "tutorial": "sk-e2e-tutorial",
}
FOOTER = "Answered through oproxy, as the tutorial says."


class Receiver(ThreadingHTTPServer):
    """A webhook receiver that answers 503 to its first ``failures`` POSTs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.records: list[dict[str, Any]] = []
        self.attempts = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/records?token=secret"

    def by_id(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {r["request_id"]: r for r in self.records}


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.attempts += 1
            failing = self.server.failures > 0
            if failing:
                self.server.failures -= 1
            else:
                self.server.records.extend(json.loads(body))
        self.send_response(503 if failing else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver(failures=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tutorial_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorial's plugin, built from the files the doc includes and installed in a directory."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "oproxy-footer"
    source.mkdir()
    for name in ("pyproject.toml", "oproxy_footer.py"):
        (source / name).write_text((TUTORIAL / name).read_text())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "oproxy_footer.py").exists()
    return target


def plugins_config(receiver: Receiver) -> str:
    return f"""
plugins:
  - name: block-words
    config: {{patterns: ["forbidden-topic"]}}
  - name: pii-redact
    keys: [plain, strict, lenient, capped, tutorial]
  - name: pii-redact
    config: {{requests: false, answers: true}}
    keys: [viewer]
  - name: system-prompt
    config: {{text: "Be brief."}}
    models: ["qwen3*"]
  - name: max-tokens-cap
    config: {{max_tokens: 3}}
    keys: [capped]
  - name: faults
    keys: [strict]
    on_error: reject
    timeout: 0.5
  - name: faults
    keys: [lenient]
    on_error: skip
    timeout: 0.5
  - name: footer
    config: {{text: "{FOOTER}"}}
    keys: [tutorial]
  - name: webhook
    config: {{url: "{receiver.url}", batch_size: 10, flush_interval: 0.2, backoff: 0.2}}
"""


def environment(*paths: Path) -> dict[str, str]:
    search = [str(ROOT), *map(str, paths), os.environ.get("PYTHONPATH", "")]
    env = {f"E2E_{name.upper()}_KEY": secret for name, secret in KEYS.items()}
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in search if p)}


def keys_config() -> str:
    listed = "\n".join(
        f'    - {{name: {name}, key: "${{E2E_{name.upper()}_KEY}}"}}' for name in KEYS
    )
    return f"auth:\n  keys:\n{listed}\n"


@pytest.fixture(scope="module")
def plugged(
    workdir: Path, fake_ollama_process: Daemon, receiver: Receiver, tutorial_package: Path
) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / "plugins.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends: [{{name: local, type: ollama, url: "{fake_ollama_process.url}"}}]
workers: 2
{keys_config()}
{plugins_config(receiver)}
"""
    )
    check = subprocess.run(
        [sys.executable, "-c", "from oproxy.cli import main; main()", "check-config", str(config)],
        env={**os.environ, **environment(DROP_INS, tutorial_package)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    daemon = start_twistd(
        ["oproxy", "--config", str(config)],
        port,
        workdir,
        "plugins",
        environment(DROP_INS, tutorial_package),
    )
    wait_for(lambda: daemon.log.read_text().count(" serving (pid ") == 2)
    yield daemon
    daemon.stop()
    log = daemon.log.read_text()
    assert not any(secret in log for secret in KEYS.values())
    assert "token=secret" not in log


def client(daemon: Daemon, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=KEYS[key], max_retries=0)


def ask(daemon: Daemon, key: str, content: str, model: str = "llama3.2", **more: Any) -> Any:
    with client(daemon, key) as c:
        return c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], **more
        )


def stream(daemon: Daemon, key: str, content: str) -> tuple[list[str], Exception | None]:
    """The streamed pieces of text, and the error that ended the stream, if one did."""
    pieces: list[str] = []
    with client(daemon, key) as c:
        try:
            for chunk in c.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": content}], stream=True
            ):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
        except openai.APIError as e:
            return pieces, e
    return pieces, None


def native(daemon: Daemon, key: str) -> ollama.Client:
    return ollama.Client(
        host=daemon.url, headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=30
    )


# -- request hooks --------------------------------------------------------------------------


def test_requests_are_redacted_before_the_model_sees_them(plugged: Daemon) -> None:
    reply = ask(plugged, "plain", "write to jane.doe@example.com now")
    assert reply.choices[0].message.content.startswith("You said: write to [EMAIL] now.")
    answer = native(plugged, "plain").chat(
        model="llama3.2", messages=[{"role": "user", "content": "I am +1 415 555 2671"}]
    )
    assert answer.message.content.startswith("You said: I am [PHONE].")


def test_blocked_words_are_refused_in_each_dialect(plugged: Daemon) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        ask(plugged, "plain", "tell me about the forbidden-topic")
    assert raised.value.status_code == 400 and raised.value.code == "content_blocked"
    with pytest.raises(ollama.ResponseError) as refused:
        native(plugged, "plain").chat(
            model="llama3.2", messages=[{"role": "user", "content": "the Forbidden-Topic"}]
        )
    assert refused.value.status_code == 400 and "blocked topic" in refused.value.error


def test_a_system_prompt_for_some_models_and_a_cap_for_some_keys(plugged: Daemon) -> None:
    plain = ask(plugged, "plain", "count my words please", model="llama3.2")
    prompted = ask(plugged, "plain", "count my words please", model="qwen3")
    # The fake counts every message's words: "Be brief." is two more.
    assert prompted.usage.prompt_tokens == plain.usage.prompt_tokens + 2
    capped = ask(plugged, "capped", "tell me a long story", model="llama3.2")
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.completion_tokens == 3


# -- answers and chunks -----------------------------------------------------------------------


def test_answers_are_redacted_whole_and_across_chunk_boundaries(plugged: Daemon) -> None:
    said = "card 4111 1111 1111 1111 thanks"
    whole = ask(plugged, "viewer", said).choices[0].message.content
    assert whole.startswith("You said: card [CARD] thanks.")
    pieces, error = stream(plugged, "viewer", said)
    assert error is None
    assert "".join(pieces) == whole
    assert not any(re.search(r"\d\d", piece) for piece in pieces)  # no digit of the card
    lines = list(
        native(plugged, "viewer").chat(
            model="llama3.2", messages=[{"role": "user", "content": said}], stream=True
        )
    )
    assert "".join(line.message.content or "" for line in lines) == whole
    assert lines[-1].done


# -- failures and timeouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "code"),
    [("fail-request", "plugin_failed"), ("hang-request", "plugin_timeout")],
)
def test_a_failing_plugin_that_rejects_refuses_the_request(
    plugged: Daemon, order: str, code: str
) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        ask(plugged, "strict", f"please {order}")
    assert raised.value.status_code == 500 and raised.value.code == code
    # Others are served meanwhile, by both workers.
    for _ in range(4):
        assert ask(plugged, "strict", "hello").choices[0].message.content


@pytest.mark.parametrize("order", ["fail-request", "hang-request", "fail-response"])
def test_a_failing_plugin_that_skips_is_passed_over(plugged: Daemon, order: str) -> None:
    reply = ask(plugged, "lenient", f"please {order}")
    assert reply.choices[0].message.content.startswith(f"You said: please {order}.")


def test_a_chunk_hook_failing_mid_stream_ends_it_with_an_error_event(plugged: Daemon) -> None:
    pieces, error = stream(plugged, "strict", "please fail-chunk")
    assert isinstance(error, openai.APIError)
    assert "faults" in str(error)
    assert len(pieces) == 2  # the third chunk failed
    pieces, error = stream(plugged, "lenient", "please fail-chunk")
    assert error is None
    assert "".join(pieces).startswith("You said: please fail-chunk.")


def test_failures_are_logged_with_the_request_id(plugged: Daemon) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        ask(plugged, "strict", "please fail-response")
    request_id = raised.value.response.headers["x-request-id"]
    wait_for(
        lambda: f"Plugin faults failed in on_response ({request_id})" in plugged.log.read_text()
    )
    assert "the faults plugin was told to fail in response" in plugged.log.read_text()


# -- completion: the webhook --------------------------------------------------------------------


def test_every_finished_request_reaches_the_webhook(plugged: Daemon, receiver: Receiver) -> None:
    ids = []
    for number in range(6):
        with client(plugged, "plain") as c:
            raw = c.chat.completions.with_raw_response.create(
                model="llama3.2",
                messages=[{"role": "user", "content": f"record {number}"}],
                stream=number % 2 == 1,
            )
            ids.append(raw.headers["x-request-id"])
            if number % 2:
                list(raw.parse())
    wait_for(lambda: set(ids) <= set(receiver.by_id()), seconds=30)
    records = receiver.by_id()
    assert receiver.attempts > 2  # it failed twice first, and was retried
    for number, request_id in enumerate(ids):
        record = records[request_id]
        assert record["route"] == "/v1/chat/completions" and record["key"] == "plain"
        assert record["status"] == 200 and record["stream"] is (number % 2 == 1)
        assert record["completion_tokens"] > 0 and record["seconds"] > 0
        assert "record" not in json.dumps(record)  # nothing the client said


# -- the tutorial -------------------------------------------------------------------------------


def test_the_tutorials_plugin_installed_with_pip_is_found_and_runs(plugged: Daemon) -> None:
    whole = ask(plugged, "tutorial", "hello").choices[0].message.content
    assert whole.endswith("\n\n" + FOOTER)
    pieces, error = stream(plugged, "tutorial", "hello")
    assert error is None and "".join(pieces) == whole
    answer = native(plugged, "tutorial").chat(
        model="llama3.2", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.message.content.endswith(FOOTER)
    # Nobody else gets the footer.
    assert not ask(plugged, "plain", "hello").choices[0].message.content.endswith(FOOTER)


# -- reloads -------------------------------------------------------------------------------------


def chat_raw(url: str, content: str) -> tuple[int, str]:
    """One chat on a connection of its own: the kernel picks the worker."""
    body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": content}]})
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_reload_adds_and_removes_plugins(workdir: Path, fake_ollama_process: Daemon) -> None:
    port = free_port()
    config = workdir / "reload-plugins.yaml"
    base = f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends: [{{name: local, url: "{fake_ollama_process.url}"}}]
workers: 2
reload: {{watch: true, interval: 0.2}}
"""
    config.write_text(base)
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, f"reload-{port}")
    try:
        log = daemon.log.read_text
        wait_for(lambda: log().count(" serving (pid ") == 2)

        def reloads() -> int:
            return log().count("Configuration reloaded from ")

        said = "mail me at jo@example.com"
        assert all("jo@example.com" in chat_raw(daemon.url, said)[1] for _ in range(4))
        config.write_text(base + "plugins: [{name: pii-redact}]\n")
        wait_for(lambda: reloads() == 2)
        answers = [chat_raw(daemon.url, said) for _ in range(8)]
        assert all(status == 200 and "[EMAIL]" in text for status, text in answers), answers
        # A file that names a plugin badly is refused: the running chain stays.
        config.write_text(base + "plugins: [{name: pii-redact}, {name: nope}]\n")
        wait_for(lambda: log().count("plugins[1].name: no plugin named 'nope'") >= 1)
        assert all("[EMAIL]" in chat_raw(daemon.url, said)[1] for _ in range(4))
        config.write_text(base + "plugins: []\n")
        wait_for(lambda: reloads() == 4)
        assert all("jo@example.com" in chat_raw(daemon.url, said)[1] for _ in range(8))
    finally:
        daemon.stop()
