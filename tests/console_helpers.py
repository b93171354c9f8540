"""
Running the console in the test process: a proxy over the fake Ollama with
the console's parts wired as the daemon wires them (a config file, the
access log, a reload that swaps the configuration), and a client that signs
in and keeps its cookie and CSRF token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from attrs import evolve
from twisted.internet import reactor, task
from twisted.web.client import Agent, HTTPConnectionPool

from oproxy.app import ProxyApp
from oproxy.config import Config, load_config
from oproxy.console.parts import ConfigSource, reload_here
from oproxy.logs import AccessLog
from oproxy.reload import Reloader
from oproxy.tap import build_app, build_router, build_site, connection_pool
from oproxy.testing import FakeOllama
from tests.conftest import listen

ADMIN_KEY = "sk-admin-0123456789abcdef"
USER_KEY = "sk-user-0123456789abcdef"


def config_text(fake_url: str, access_log: Path, extra: str = "") -> str:
    return f"""\
# A console test's configuration.
backends:
  - name: local
    type: ollama
    url: "{fake_url}"
auth:
  keys:
    - name: boss
      key: "{ADMIN_KEY}"
      admin: true
    - name: user
      key: "{USER_KEY}"
images:
  allow_private_networks: true
access_log:
  path: "{access_log}"
{extra}"""


@dataclass
class Answer:
    code: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return list(self.headers.getRawHeaders(name) or [])


@dataclass
class Console:
    """A proxy with its console, and a browser-like client for it."""

    url: str
    app: ProxyApp
    fake: FakeOllama
    config_path: Path
    access_log: Path
    client: treq.client.HTTPClient
    cookie: str | None = None
    csrf: str | None = None
    reloads: list[bool] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        cookie: str | None = None,
        csrf: bool = True,
        bearer: str | None = None,
    ) -> Answer:
        sent: dict[str, list[str]] = {}
        jar = cookie if cookie is not None else self.cookie
        if jar:
            sent["Cookie"] = [f"oproxy_console={jar}"]
        if bearer:
            sent["Authorization"] = [f"Bearer {bearer}"]
        data: bytes | None = None
        if json is not None:
            sent["Content-Type"] = ["application/json"]
            data = orjson.dumps(json)
        elif form is not None:
            sent["Content-Type"] = ["application/x-www-form-urlencoded"]
            from urllib.parse import urlencode

            data = urlencode(form).encode()
        if method != "GET" and csrf and self.csrf and json is not None:
            sent["X-CSRF-Token"] = [self.csrf]
        for name, value in (headers or {}).items():
            sent[name] = [value]
        response = await self.client.request(
            method, self.url + path, headers=sent, data=data, allow_redirects=False
        )
        return Answer(response.code, response.headers, await treq.content(response))

    async def sign_in(self, key: str = ADMIN_KEY) -> Answer:
        answer = await self.request("POST", "/ui/login", form={"key": key, "next": "/ui/"})
        cookie = session_cookie(answer)
        if cookie:
            self.cookie = cookie
            page = await self.request("GET", "/ui/")
            found = re.search(rb'name="csrf-token" content="([^"]+)"', page.body)
            assert found is not None
            self.csrf = found.group(1).decode()
        return answer

    async def settled(self) -> None:
        while self.app.after_send.waiting:
            await task.deferLater(reactor, 0, lambda: None)

    async def chat(self, model: str = "llama3.2", key: str = USER_KEY) -> Answer:
        answer = await self.request(
            "POST",
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            bearer=key,
            cookie="",
        )
        await self.settled()
        return answer


def session_cookie(answer: Answer) -> str | None:
    for value in answer.headers_named("Set-Cookie"):
        name, _, rest = value.partition("=")
        if name == "oproxy_console":
            token = rest.split(";", 1)[0]
            return token or None
    return None


@pytest.fixture
def console_factory(fake_ollama: tuple[FakeOllama, str], tmp_path: Path) -> Iterator[Any]:
    """Start consoles over the fake Ollama; stop them afterwards."""
    fake, fake_url = fake_ollama
    cleanups: list[Any] = []
    client_pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=client_pool))

    def start(extra: str = "", *, text: str | None = None, with_file: bool = True) -> Console:
        access_log = tmp_path / "access.jsonl"
        path = tmp_path / "oproxy.yaml"
        path.write_text(text if text is not None else config_text(fake_url, access_log, extra))

        def load(source: str) -> Config:
            return load_config(source, os.environ)

        config = load(path.read_text())
        pool = connection_pool(reactor)
        log = AccessLog(config.access_log.path) if config.access_log else None
        reloads: list[bool] = []
        reloader: Reloader | None = None

        def reload() -> bool:
            assert reloader is not None
            done = reloader.reload()
            reloads.append(done)
            return done

        source = ConfigSource(str(path) if with_file else None, load, reload_here(reload))
        app = build_app(config, reactor, pool, log, config_source=source)
        reloader = Reloader(
            app,
            lambda: load(path.read_text()),
            lambda new: build_router(new, reactor, pool, app.router.state),
            lambda new: app.cache,
            retire_cache=lambda cache: None,
            source=str(path),
        )
        app.guard.start()
        if log is not None:
            log.open()
        running = listen(build_site(app))
        console = app.services.console
        assert console is not None
        cleanups.append(lambda: console.stop())
        cleanups.append(app.guard.close)
        cleanups.append(running.port.stopListening)
        cleanups.append(pool.closeCachedConnections)
        if log is not None:
            cleanups.append(log.close)
        return Console(running.url, app, fake, path, access_log, client, reloads=reloads)

    yield start
    for cleanup in reversed(cleanups):
        result = cleanup()
        if result is not None:
            pytest_twisted.blockon(result)


def with_config(console: Console, **changes: Any) -> None:
    """Swap the running configuration, as a reload would."""
    app = console.app
    app.swap(evolve(app.config, **changes), app.router, app.cache)
