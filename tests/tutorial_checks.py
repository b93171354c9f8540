"""
Checks for configuration the tutorials show for programs that cannot run
here (an editor, a web application in a container, Grafana).

Each check reads its block as the program does, asserts it points where
the tutorial says, and makes the requests the program makes with it,
against the oproxy the tutorial started: run inside the page's namespace
by ``tests/test_tutorials.py`` (``.. test: check NAME``).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc" / "grafana-dashboard.json"


def _client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def _streamed_chat(client: openai.OpenAI, model: str) -> str:
    text = ""
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], stream=True
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text, f"{model} streamed nothing"
    return text


def docker_run_environment(command: str) -> dict[str, str]:
    """The ``-e NAME=VALUE`` settings of a ``docker run`` command line."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["docker", "run"], words[:2]
    settings: dict[str, str] = {}
    for flag, value in itertools.pairwise(words):
        if flag in ("-e", "--env"):
            name, _, given = value.partition("=")
            settings[name] = given
    return settings


def open_webui(block: str) -> None:
    """Open WebUI's OpenAI connection: list the models, then stream a chat."""
    settings = docker_run_environment(block)
    assert settings.get("ENABLE_OLLAMA_API") == "false"
    base_url = settings["OPENAI_API_BASE_URL"]
    assert base_url.endswith("/v1"), base_url
    key = settings["OPENAI_API_KEY"]
    # Open WebUI asks for the models with its key as a bearer token...
    answer = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    models = [m["id"] for m in answer.json()["data"]]
    assert "llama3.2" in models or "llama3.2:latest" in models, models
    # ... and chats streaming.
    _streamed_chat(_client(base_url, key), "llama3.2")
    # Without the key, nothing.
    refused = httpx.get(f"{base_url}/models")
    assert refused.status_code == 401, refused.text


def continue_(block: str) -> None:
    """Continue's ``config.yaml``: each model does what its roles ask of it."""
    config = yaml.safe_load(block)
    assert config["schema"] == "v1"
    roles_seen: set[str] = set()
    for model in config["models"]:
        assert model["provider"] == "openai", model
        base_url = model["apiBase"]
        assert base_url.rstrip("/").endswith("/v1"), base_url
        client = _client(base_url, model["apiKey"])
        listed = [m.id for m in client.models.list().data]
        assert any(m.split(":")[0] == model["model"] for m in listed), (model["model"], listed)
        roles = set(model["roles"])
        roles_seen |= roles
        if roles & {"chat", "edit", "apply"}:
            _streamed_chat(client, model["model"])
        if "autocomplete" in roles:
            # Fill-in-the-middle: the code before the cursor, and after it.
            completion = client.completions.create(
                model=model["model"],
                prompt="def add(a, b):\n    ",
                suffix="\n\nprint(add(1, 2))\n",
                max_tokens=32,
                temperature=0,
            )
            assert completion.choices[0].text
        if "embed" in roles:
            vectors = client.embeddings.create(model=model["model"], input=["code"])
            assert vectors.data[0].embedding
    assert {"chat", "autocomplete", "embed"} <= roles_seen


# The Python name of the check is continue_ (continue is a keyword).
globals()["continue"] = continue_


def grafana_datasource(block: str) -> None:
    """The provisioned data source is a default Prometheus that answers."""
    provisioning = yaml.safe_load(block)
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    with urllib.request.urlopen(f"{source['url']}/-/ready", timeout=10) as answer:
        assert answer.status == 200


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query of the dashboard, as Grafana would send it for the last hour."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if "expr" in target:
                queries.append(target["expr"].replace("$__rate_interval", "1m"))
    return queries


def grafana_dashboards(block: str) -> None:
    """
    The dashboard provider finds oproxy's dashboard, whose data source is the
    Prometheus variable, and every query of it runs on Prometheus.
    """
    provisioning = yaml.safe_load(block)
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    for query in queries:
        address = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(address, timeout=10) as answer:
            result = json.loads(answer.read())
        assert result["status"] == "success", (query, result)
    # Every metric the dashboard names is one oproxy has.
    names = set(re.findall(r"\b(oproxy_[a-z_]+)", " ".join(queries)))
    known = known_metric_names()
    assert names <= known, names - known


def known_metric_names() -> set[str]:
    """The names a scrape of oproxy can show (histograms add their series)."""
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    from oproxy_reference import metric_docs

    names = set()
    for metric in metric_docs():
        names.add(metric.name)
        if metric.kind == "histogram":
            names |= {f"{metric.name}_{part}" for part in ("bucket", "sum", "count")}
    return names
