"""
The ``plugins:`` section: the issue's contract, names resolved when the
file is read (so ``oproxy check-config`` and reloads refuse what the daemon
would), errors that name their key, and the two ways plugins are found:
a module in an ``oproxy/plugins/`` directory, and an entry point.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from oproxy.cli import check_config
from oproxy.config import ConfigError, load_config
from oproxy.plugins.block_words import BlockWordsOptions
from oproxy.plugins.discovery import installed

ROOT = Path(__file__).resolve().parent.parent

CONTRACT = """
plugins:
  - name: pii-redact
  - name: block-words
    config: {patterns: ["forbidden-topic"]}
  - name: system-prompt
    config: {text: "Be brief."}
"""


def test_the_issues_contract_loads_as_written() -> None:
    config = load_config(CONTRACT, {})
    assert [p.name for p in config.plugins] == ["pii-redact", "block-words", "system-prompt"]
    blocking = config.plugins[1]
    assert blocking.config == BlockWordsOptions(patterns=("forbidden-topic",))
    assert (blocking.routes, blocking.keys, blocking.models) == ((), (), ())
    assert (blocking.on_error, blocking.timeout) == ("reject", 2.0)
    assert blocking.factory is installed().find("block-words")


def test_every_setting_of_an_entry() -> None:
    config = load_config(
        """
plugins:
  - name: max-tokens-cap
    config: {max_tokens: 256}
    routes: ["/v1/chat/completions", "/api/*"]
    keys: [alice, "ci-*"]
    models: ["llama3*"]
    on_error: skip
    timeout: 0.5
""",
        {},
    )
    [entry] = config.plugins
    assert entry.routes == ("/v1/chat/completions", "/api/*")
    assert entry.keys == ("alice", "ci-*") and entry.models == ("llama3*",)
    assert (entry.on_error, entry.timeout, entry.config.max_tokens) == ("skip", 0.5, 256)


def test_no_plugins_is_an_empty_tuple() -> None:
    assert load_config("plugins:", {}).plugins == ()
    assert load_config("plugins: []", {}).plugins == ()
    assert load_config(None, {}).plugins == ()


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("plugins: [{name: pii-redactt}]", "plugins[0].name", "no plugin named 'pii-redactt'"),
        ("plugins: [{config: {}}]", "plugins[0].name", "is required"),
        ("plugins: [{name: pii-redact}, {name: block-words}]", "plugins[1].config.patterns", ""),
        (
            "plugins: [{name: block-words, config: {patterns: [x], regexp: true}}]",
            "plugins[0].config.regexp",
            "is not a known setting",
        ),
        (
            'plugins: [{name: pii-redact, config: {patterns: ["ok", "(no"]}}]',
            "plugins[0].config.patterns[1]",
            "must be a regular expression",
        ),
        ("plugins: [{name: pii-redact, on_error: ignore}]", "plugins[0].on_error", "one of"),
        ("plugins: [{name: pii-redact, routes: [chat]}]", "plugins[0].routes[0]", "route"),
        ("plugins: [{name: pii-redact, timeout: 0}]", "plugins[0].timeout", "positive"),
        ("plugins: [{name: pii-redact, filters: {}}]", "plugins[0].filters", "not a known"),
        ("plugins: [{name: pii-redact, config: [1]}]", "plugins[0].config", "mapping"),
        ("plugins: {name: pii-redact}", "plugins", "must be a list"),
    ],
)
def test_mistakes_are_named_by_their_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert raised.value.key == key
    assert problem in raised.value.problem


def test_the_unknown_name_lists_the_installed_plugins() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("plugins: [{name: nope}]", {})
    assert raised.value.problem == (
        "no plugin named 'nope' is installed (installed: block-words, max-tokens-cap, "
        "pii-redact, system-prompt, webhook)"
    )


def test_check_config_refuses_an_unknown_plugin_or_option(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CONTRACT)
    out = io.StringIO()
    assert check_config(str(good), out) == 0
    assert "valid" in out.getvalue()
    for text, said in [
        ("plugins: [{name: pii-redact}, {name: no-such-plugin}]", "plugins[1].name: no plugin"),
        (
            "plugins: [{name: system-prompt, config: {txt: hi}}]",
            "plugins[0].config.text: is required",
        ),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        out = io.StringIO()
        assert check_config(str(bad), out) == 1
        assert out.getvalue().startswith(f"{bad}: {said}")


# -- discovery, in a process of its own (as the daemon finds them) -------------------------

DROP_IN = """
import attrs
from zope.interface import implementer
from oproxy.plugins.interface import IRequestHook, PluginFactory


@attrs.frozen
class Options:
    greeting: str = "hello"


@implementer(IRequestHook)
class Greeter:
    def on_request(self, exchange, body):
        return None


greeter = PluginFactory("greeter", lambda options, env: Greeter(), options=Options)
"""

ENTRY_MODULE = """
from zope.interface import implementer
from oproxy.plugins.interface import ICompletionHook, PluginFactory


@implementer(ICompletionHook)
class Counter:
    def on_complete(self, exchange, outcome):
        return None


factory = PluginFactory("counter", lambda options, env: Counter())
other_greeter = PluginFactory("greeter", lambda options, env: Counter())
"""


def installation(tmp_path: Path, entry_points: str) -> dict[str, str]:
    """A directory with a drop-in module and a distribution with entry points."""
    drop_ins = tmp_path / "oproxy" / "plugins"
    drop_ins.mkdir(parents=True)
    (drop_ins / "greeter_plugin.py").write_text(DROP_IN)
    (tmp_path / "counter_plugin.py").write_text(ENTRY_MODULE)
    info = tmp_path / "oproxy_counter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: oproxy-counter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def check(env: dict[str, str], config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from oproxy.cli import main; main()", "check-config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_plugins_are_found_dropped_in_and_by_entry_point(tmp_path: Path) -> None:
    env = installation(
        tmp_path,
        """
        [oproxy.plugins]
        counter = counter_plugin:factory
        """,
    )
    config = tmp_path / "oproxy.yaml"
    config.write_text(
        "plugins: [{name: greeter, config: {greeting: hi}}, {name: counter}, {name: pii-redact}]"
    )
    done = check(env, config)
    assert done.returncode == 0, done.stdout + done.stderr
    config.write_text("plugins: [{name: greeter, config: {greet: hi}}]")
    done = check(env, config)
    assert done.returncode == 1
    assert done.stdout.strip() == f"{config}: plugins[0].config.greet: is not a known setting"


def test_a_broken_or_ambiguous_plugin_is_named_and_hides_no_other(tmp_path: Path) -> None:
    env = installation(
        tmp_path,
        """
        [oproxy.plugins]
        counter = counter_plugin:factory
        greeter = counter_plugin:other_greeter
        missing = no_such_module:factory
        """,
    )
    config = tmp_path / "oproxy.yaml"
    config.write_text("plugins: [{name: counter}, {name: pii-redact}]")
    assert check(env, config).returncode == 0
    config.write_text("plugins: [{name: missing}]")
    done = check(env, config)
    assert "plugins[0].name: the plugin 'missing' could not be loaded: ModuleNotFoundError" in (
        done.stdout
    )
    config.write_text("plugins: [{name: greeter}]")
    done = check(env, config)
    assert "plugins[0].name: more than one installed plugin is named 'greeter'" in done.stdout
