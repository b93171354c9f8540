"""
The Compose stack (``compose.yaml``), end to end, without a Docker engine.

The file is checked against the Compose Specification's JSON schema
(``tests/schemas/``).  Then its services are started natively, each with
its own command (the image's ``CMD`` from the ``Dockerfile`` where the file
gives none), environment and configuration files, in a network namespace
where every service name resolves to loopback, as on Compose's network:

* ``oproxy``: ``twistd -n oproxy`` with two workers, from this checkout;
* ``ollama``: the fake Ollama in its place, on Ollama's port;
* ``redis``: Debian's ``redis-server`` with the file's arguments;
* ``prometheus``: Debian's ``prometheus`` with the file's arguments;
* ``grafana`` cannot run here: its provisioning is checked, and every query
  of the dashboard it provisions runs on the Prometheus.

A path inside a container (a bind mount, a named volume, a secret) is the
one thing translated: to the file in this checkout, or a directory of the
test's own.  The checks then use the stack as a user would: the ``openai``
SDK through oproxy, keys made with ``oproxy keys`` landing in Redis and
working in both workers, answers cached in Redis, Prometheus scraping
oproxy with its token, the image's health check, and the blocks of
``docs/tutorials/docker-compose.rst``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.docblocks import DOCS, Block, read_page
from tests.sandbox import Namespace, in_ci, missing_or_skip
from tests.tutorial_checks import dashboard_queries

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
TUTORIAL = DOCS / "tutorials" / "docker-compose.rst"

#: Where each service listens inside its container (its image's default
#: where the file does not publish a port).
IMAGE_PORTS = {"ollama": 11434, "redis": 6379}


# -- the files ---------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=VALUE`` lines, as Compose reads ``.env``."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip().strip("'\"")
    return values


_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        value = environ.get(name)
        if operator in (":-", "-"):
            return value if value else argument
        if operator in (":?", "?"):
            if not value:
                raise AssertionError(f"{name}: {argument}")
            return value
        return value or ""

    return _REFERENCE.sub(substitute, text)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n\s*",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def final_stage(text: str) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(text)
    last = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last:]


def image_command(text: str) -> list[str]:
    (command,) = [json.loads(a) for name, a in final_stage(text) if name == "CMD"]
    return list(command)


def image_environment(text: str) -> dict[str, str]:
    environment = {}
    for name, arguments in final_stage(text):
        if name == "ENV":
            for pair in re.findall(r"(\w+)=(\S+)", arguments):
                environment[pair[0]] = pair[1]
    return environment


def image_healthcheck(text: str) -> list[str]:
    (check,) = [a for name, a in final_stage(text) if name == "HEALTHCHECK"]
    return list(json.loads(check[check.index("CMD") + 3 :].strip()))


# -- the static checks ---------------------------------------------------------------


def compose_document(environ: Mapping[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), environ))
    return document


def test_the_compose_file_follows_the_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    document = yaml.safe_load(COMPOSE.read_text())
    jsonschema.Draft7Validator(schema).validate(document)
    assert set(document["services"]) == {"oproxy", "ollama", "redis", "prometheus", "grafana"}


def test_the_compose_file_needs_its_secrets() -> None:
    """Without ``.env`` the stack does not start with guessable secrets."""
    with pytest.raises(AssertionError, match="OPROXY_ADMIN_KEY"):
        compose_document({})
    compose_document(read_env_file(ROOT / ".env.example"))


def test_the_image() -> None:
    """Multi-stage, slim, an unprivileged user, a health check without curl, a volume."""
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions(text)
    bases = [a for name, a in instructions if name == "FROM"]
    assert len(bases) >= 2, "a build stage and a run stage"
    assert all("-slim" in base for base in bases), bases
    final = final_stage(text)
    (user,) = [a for name, a in final if name == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    check = image_healthcheck(text)
    assert check[0] == "python" and "/healthz" in check[-1]
    assert not [a for _, a in instructions if "curl" in a], "no curl in a slim image"
    volumes = [v for name, a in final if name == "VOLUME" for v in json.loads(a)]
    assert image_environment(text)["STATE_DIRECTORY"] in volumes
    command = image_command(text)
    assert command[:2] == ["twistd", "-n"] and "oproxy" in command
    assert command[-2:] == ["--config", "/etc/oproxy/oproxy.yaml"]
    copied = [a.split() for name, a in final if name == "COPY" and "--from" not in a]
    assert ["deploy/docker/oproxy.yaml", "/etc/oproxy/oproxy.yaml"] in copied


def test_the_image_default_configuration_loads_from_the_environment() -> None:
    from oproxy.config import ConfigError, load_config

    text = (ROOT / "deploy" / "docker" / "oproxy.yaml").read_text()
    config = load_config(text, {"OPROXY_ADMIN_KEY": "sk-admin"})
    assert config.listen == ("tcp:8000",)
    assert config.backends[0].url == "http://ollama:11434"
    assert config.auth.require_keys
    with pytest.raises(ConfigError, match="OPROXY_ADMIN_KEY"):
        load_config(text, {})


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    document = compose_document(read_env_file(ROOT / ".env.example"))
    mounts = bind_mounts(document["services"]["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "oproxy.yaml").read_text())[
        "providers"
    ]
    dashboards = {c: h for c, h in mounts.items() if c.startswith(provider["options"]["path"])}
    assert [h.name for h in dashboards.values()] == ["grafana-dashboard.json"]
    json.loads(next(iter(dashboards.values())).read_text())


# -- the stack, natively ---------------------------------------------------------------


def bind_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path → file or directory of this checkout."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


@dataclass
class Service:
    name: str
    argv: list[str]
    environment: dict[str, str]
    port: int
    cwd: Path
    paths: dict[str, Path] = field(default_factory=dict)


class Stack:
    """The services of the Compose file, running natively in one namespace."""

    def __init__(self, workdir: Path, environ: dict[str, str]) -> None:
        self.workdir = workdir
        self.environ = environ
        self.document = compose_document(environ)
        self.services: dict[str, Service] = {}
        names = dict.fromkeys(self.document["services"], "127.0.0.1")
        self.namespace = Namespace(workdir, names)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # Where container paths are, here.

    def volume(self, name: str) -> Path:
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def paths_of(self, name: str, service: Mapping[str, Any]) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            paths[target] = (
                (ROOT / source).resolve() if source.startswith((".", "/")) else self.volume(source)
            )
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            definition = self.document["secrets"][secret_name]
            path = self.workdir / "secrets" / name / secret_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.environ[definition["environment"]])
            paths[f"/run/secrets/{secret_name}"] = path
        # A mounted configuration file is read here with the same paths translated.
        for target, source in list(paths.items()):
            if source.is_file() and source.suffix in (".yml", ".yaml"):
                copy = self.workdir / "mounted" / name / source.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_text(self.translate(source.read_text(), paths))
                paths[target] = copy
        return paths

    @staticmethod
    def translate(text: str, paths: Mapping[str, Path]) -> str:
        for target in sorted(paths, key=len, reverse=True):
            text = re.sub(
                rf"(?<![\w/.]){re.escape(target)}(?=$|[/\s\"',:])", str(paths[target]), text
            )
        return text

    # The services.

    def service(self, name: str) -> Service:
        definition = self.document["services"][name]
        paths = self.paths_of(name, definition)
        environment: dict[str, str] = {}
        if name == "oproxy":
            dockerfile = DOCKERFILE.read_text()
            environment.update(image_environment(dockerfile))
            argv = definition.get("command") or image_command(dockerfile)
        elif name == "ollama":
            # The fake in Ollama's place, on the port the image listens on.
            argv = [
                "twistd",
                "-n",
                "--pidfile=",
                "--logfile=-",
                "oproxy-fake-ollama",
                "--listen",
                f"tcp:{IMAGE_PORTS['ollama']}",
            ]
        else:
            entrypoint = definition.get("entrypoint") or []
            argv = [*entrypoint, *definition.get("command", [])]
        environment.update({k: str(v) for k, v in definition.get("environment", {}).items()})
        environment = {k: self.translate(v, paths) for k, v in environment.items()}
        argv = [self.translate(a, paths) for a in argv]
        argv[0] = shutil.which(Path(argv[0]).name) or argv[0]
        published = [str(p).rsplit(":", 1)[-1] for p in definition.get("ports", [])]
        port = int(published[0]) if published else IMAGE_PORTS[name]
        cwd = self.volume(f"workdir-{name}")
        return Service(name, argv, environment, port, cwd, paths)

    def process_environment(self, service: Service) -> dict[str, str]:
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPROXY_", "OLLAMA_"))
        }
        environment = {**inherited, **service.environment}
        if "/etc/oproxy/oproxy.yaml" in service.paths:
            # What ``oproxy keys`` finds at /etc/oproxy/oproxy.yaml in the container.
            environment["OPROXY_CONFIG"] = str(service.paths["/etc/oproxy/oproxy.yaml"])
        return environment

    def start(self, name: str) -> None:
        service = self.service(name)
        self.services[name] = service
        log = self.workdir / f"{name}.log"
        process = self.namespace.start(
            service.argv, log=log, cwd=service.cwd, env=self.process_environment(service)
        )
        self.processes[name] = process
        self.namespace.wait_for_port(service.port, process=process, log=log, seconds=90)
        check = self.document["services"][name].get("healthcheck", {}).get("test")
        if check:
            self.until_healthy(name, [c for c in check if c != "CMD"])

    def until_healthy(self, name: str, argv: list[str], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while self.namespace.run(argv).returncode != 0:
            assert time.monotonic() < deadline, f"{name} never became healthy"
            time.sleep(0.5)

    def order(self) -> list[str]:
        """Services in an order that starts each after what it depends on."""
        done: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            for dependency in self.document["services"][name].get("depends_on", []):
                visit(dependency)
            done.append(name)

        for name in self.document["services"]:
            visit(name)
        return done

    def exec(self, name: str, argv: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        """``docker compose exec NAME ARGV``: the service's environment and files."""
        service = self.services[name]
        argv = [self.translate(a, service.paths) for a in argv]
        return self.namespace.run(
            argv, cwd=service.cwd, env=self.process_environment(service), **options
        )

    def python(
        self, code: str, *, timeout: float = 120, extra: Mapping[str, str] | None = None
    ) -> str:
        """Run a client program inside the stack's network; its standard output."""
        script = self.workdir / f"client-{secrets.token_hex(4)}.py"
        script.write_text(code)
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OPROXY_"))
        }
        environment.update(extra or {})
        done = self.namespace.run([sys.executable, str(script)], env=environment, timeout=timeout)
        assert done.returncode == 0, done.stdout + done.stderr + self.logs()
        return done.stdout

    def logs(self) -> str:
        return "".join(
            f"\n--- {log.name}\n{log.read_text()[-4000:]}"
            for log in sorted(self.workdir.glob("*.log"))
        )

    def close(self) -> None:
        self.namespace.close()


RUNNABLE = ("redis", "ollama", "oproxy", "prometheus")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing_or_skip(["redis-server", "redis-cli"], "the stack's Redis is Debian's")
    # The user copies .env.example to .env and sets new secrets, as told there.
    environ = read_env_file(ROOT / ".env.example")
    environ["OPROXY_ADMIN_KEY"] = "sk-" + secrets.token_urlsafe(24)
    environ["OPROXY_METRICS_TOKEN"] = secrets.token_urlsafe(24)
    environ["GRAFANA_ADMIN_PASSWORD"] = secrets.token_urlsafe(12)
    stack = Stack(tmp_path_factory.mktemp("compose"), environ)
    try:
        for name in stack.order():
            if name == "prometheus" and shutil.which("prometheus") is None:
                continue
            if name in RUNNABLE:
                stack.start(name)
        yield stack
    finally:
        stack.close()


def client_code(stack: Stack, body: str, key: str | None = None) -> str:
    return (
        "import openai\n"
        f"client = openai.OpenAI(base_url='http://oproxy:8000/v1', "
        f"api_key={key or stack.environ['OPROXY_ADMIN_KEY']!r}, max_retries=0)\n" + body
    )


def test_the_sdk_through_oproxy(stack: Stack) -> None:
    output = stack.python(
        client_code(
            stack,
            "reply = client.chat.completions.create(model='llama3.2', "
            "messages=[{'role': 'user', 'content': 'hi'}])\n"
            "print('reply:', reply.choices[0].message.content)\n"
            "text = ''\n"
            "for chunk in client.chat.completions.create(model='llama3.2', stream=True, "
            "messages=[{'role': 'user', 'content': 'hi'}]):\n"
            "    text += chunk.choices[0].delta.content or '' if chunk.choices else ''\n"
            "print('streamed:', bool(text))\n"
            "anonymous = openai.OpenAI(base_url='http://oproxy:8000/v1', api_key='wrong', "
            "max_retries=0)\n"
            "try:\n"
            "    anonymous.models.list()\n"
            "except openai.AuthenticationError as e:\n"
            "    print('refused:', e.status_code)\n",
        )
    )
    assert "reply: " in output and "streamed: True" in output and "refused: 401" in output
    # Both workers serve: the master says so.
    assert "with 2 worker processes" in (stack.workdir / "oproxy.log").read_text()


def test_keys_live_in_redis_and_work_in_every_worker(stack: Stack) -> None:
    made = stack.exec("oproxy", ["oproxy", "keys", "create", "bob", "--rpm", "600"])
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-")
    stored = stack.namespace.run(["redis-cli", "-h", "redis", "--scan", "--pattern", "oproxy:*"])
    assert stored.returncode == 0 and stored.stdout.strip(), stored
    output = stack.python(
        client_code(
            stack,
            "for _ in range(8):\n"
            "    client.chat.completions.create(model='llama3.2', "
            "messages=[{'role': 'user', 'content': 'hi'}])\n"
            "print('ok')\n",
            key,
        )
    )
    assert output.strip() == "ok"
    listed = stack.exec("oproxy", ["oproxy", "keys", "list"])
    assert "bob" in listed.stdout, listed


def test_answers_are_cached_in_redis(stack: Stack) -> None:
    output = stack.python(
        client_code(
            stack,
            "for _ in range(2):\n"
            "    raw = client.embeddings.with_raw_response.create(model='all-minilm', "
            "input='cache me, compose')\n"
            "    print(raw.headers.get('x-cache'))\n",
        )
    )
    assert output.split() == ["MISS", "HIT"]
    cached = stack.namespace.run(["redis-cli", "-h", "redis", "--scan", "--pattern", "*cache*"])
    assert cached.stdout.strip(), cached


def test_the_image_health_check(stack: Stack) -> None:
    check = image_healthcheck(DOCKERFILE.read_text())
    check[0] = sys.executable
    assert (
        stack.namespace.run(
            check, env=stack.process_environment(stack.services["oproxy"])
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Stack:
    if "prometheus" not in stack.processes:
        message = "prometheus not installed (Debian's prometheus package)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return stack


def query(stack: Stack, promql: str) -> dict[str, Any]:
    output = stack.python(
        "import json, urllib.parse, urllib.request\n"
        "address = 'http://prometheus:9090/api/v1/query?' + urllib.parse.urlencode("
        f"{{'query': {promql!r}}})\n"
        "print(urllib.request.urlopen(address, timeout=10).read().decode())\n"
    )
    result: dict[str, Any] = json.loads(output)
    return result


def test_prometheus_scrapes_oproxy(prometheus: Stack) -> None:
    deadline = time.monotonic() + 90
    while True:
        up = query(prometheus, 'up{job="oproxy"}')["data"]["result"]
        if up and up[0]["value"][1] == "1":
            break
        assert time.monotonic() < deadline, f"Prometheus never scraped oproxy: {up}"
        time.sleep(2)
    requests = query(prometheus, "sum(oproxy_requests_total)")["data"]["result"]
    assert requests and float(requests[0]["value"][1]) > 0


def test_every_dashboard_query_runs(prometheus: Stack) -> None:
    document = prometheus.document["services"]["grafana"]
    dashboard = bind_mounts(document)["/etc/grafana/dashboards/oproxy.json"]
    for promql in dashboard_queries(json.loads(dashboard.read_text())):
        assert query(prometheus, promql)["status"] == "success", promql


# -- the tutorial's blocks -----------------------------------------------------------

PAGE = read_page(TUTORIAL)


def test_the_tutorial_is_run_here() -> None:
    assert PAGE.setup("compose"), "docker-compose.rst says its blocks run against the stack"
    assert any(b.kind == "compose-exec" for b in PAGE.blocks)


def run_block(stack: Stack, block: Block, workdir: Path, exported: dict[str, str]) -> str:
    if block.kind == "compose-exec":
        words = block.text.split()
        assert words[:3] == ["docker", "compose", "exec"], words
        rest = [w for w in words[3:] if w != "-T"]
        done = stack.exec(rest[0], rest[1:])
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        created = re.search(r"keys create (\S+)", block.text)
        if created:
            # What the reader does with the key printed once: keep it.
            exported[f"{created.group(1).upper()}_KEY"] = done.stdout.strip()
        return output
    if block.kind == "python":
        return stack.python(block.text, extra=exported)
    if block.kind == "shell":
        done = stack.namespace.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=workdir)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr
    assert block.kind == "skip", block
    return ""


def test_the_tutorial_blocks(stack: Stack, tmp_path: Path) -> None:
    exported: dict[str, str] = {}
    for block in PAGE.blocks:
        needs = [p for p in block.options.get("needs", "").split(",") if p]
        if needs and any(shutil.which(p) is None for p in needs):
            continue
        output = run_block(stack, block, tmp_path, exported)
        expected = block.options.get("expect")
        if expected:
            assert re.search(expected, output, re.MULTILINE), (block.id, output)
    assert "ALICE_KEY" in exported
