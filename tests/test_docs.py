"""
The configuration the docs show is the configuration the daemon reads.

The recipes load as they are.  Every key of the example file
(``etc/oproxy.yaml``, its commented-out examples included) and of the
reference (``docs/configuration.rst``) is accepted, and an unknown key
beside it is refused, so no documented key is a typo the parser would
reject and no section silently ignores what it does not know.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from oproxy.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: What the examples refer to with ``${...}``.
ENVIRON = {
    "ALICE_KEY": "sk-a",
    "CI_KEY": "sk-c",
    "ADMIN_KEY": "sk-admin",
    "OPENAI_API_KEY": "sk-upstream",
    "OPROXY_METRICS_TOKEN": "scrape",
    "SENTRY_DSN": "https://key@sentry.example/1",
    "AGENTS_KEY": "sk-agents",
    "CLAUDE_CODE_KEY": "sk-claude",
    "HF_TOKEN": "hf_docs_example",
}

Path_ = tuple[str | int, ...]


def yaml_blocks(text: str) -> list[str]:
    """The literal blocks (after ``::``) that look like a config file."""
    blocks = []
    for match in re.finditer(r"::\n\n((?:    .*\n|\n)+)", text):
        block = "\n".join(line[4:] for line in match.group(1).splitlines())
        first = block.strip().split("\n", 1)[0]
        if re.match(r"^[a-z_]+:", first) and not first.startswith(("import", "sudo")):
            blocks.append(block)
    return blocks


BLOCKS = yaml_blocks((DOCS / "recipes.rst").read_text())
#: The tutorials' configurations load too.
TUTORIAL_BLOCKS = [
    block
    for page in ("codex-and-agents.rst", "claude-code.rst")
    for block in yaml_blocks((DOCS / page).read_text())
]


def test_the_recipes_have_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[b.split("\n", 1)[0] for b in BLOCKS])
def test_every_recipe_loads(block: str) -> None:
    load_config(block, ENVIRON)


def test_the_tutorials_have_examples() -> None:
    assert len(TUTORIAL_BLOCKS) == 2


@pytest.mark.parametrize("block", TUTORIAL_BLOCKS)
def test_every_tutorial_configuration_loads(block: str) -> None:
    load_config(block, ENVIRON)


# -- keys, and where they are documented ---------------------------------------

#: A commented-out setting: ``# key: value``, ``# - item``, ``# "glob:*":``.
_COMMENTED = re.compile(r'^( *)# ?( *(?:- |\{|"[^"]+":|[a-z_][a-z0-9_.-]*:(?: |$)).*)$')


def uncommented(text: str) -> str:
    """The example file with its commented-out settings (not its prose) put back."""
    return "\n".join(_COMMENTED.sub(r"\1\2", line) for line in text.splitlines())


#: Mappings whose keys are the user's own (model names, options, globs).
_FREE = re.compile(r"^models$|^models\.[^.]+\.options$|\.model_limits$")
#: Mappings of limits, which name an unknown limit at the mapping's key.
_LIMITS = re.compile(r"\.anonymous_limits$|\.model_limits\.[^.]+$")


def dotted(path: Path_) -> str:
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
    return key


def key_paths(node: Any, path: Path_ = ()) -> Iterator[Path_]:
    """The path of every mapping key in a YAML tree, lists walked by index."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, str(key))
            yield from key_paths(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from key_paths(value, (*path, index))


def placed(document: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    """A copy of ``document`` with ``value`` at ``path``."""
    changed = copy.deepcopy(document)
    node: Any = changed
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[path[-1]] = value
    return changed


def given(document: dict[str, Any], path: Path_) -> Any:
    """What ``document`` has at ``path``, if anything."""
    node: Any = document
    for part in path:
        if isinstance(part, str) and part not in node:
            return None
        node = node[part]
    return node


def refuses_a_neighbour(document: dict[str, Any], path: Path_) -> None:
    """
    A misspelt key beside ``path`` is refused, at its own key; in a
    mapping of limits, at the mapping's.
    """
    parent = dotted(path[:-1])
    neighbour = (*path[:-1], f"{path[-1]}x")
    with pytest.raises(ConfigError) as raised:
        parse_config(placed(document, neighbour, 1), ENVIRON)
    if _LIMITS.search(parent):
        assert raised.value.key == parent
        assert raised.value.problem.startswith("unknown limit")
    else:
        assert (raised.value.key, raised.value.problem) == (
            dotted(neighbour),
            "is not a known setting",
        )


EXAMPLE = yaml.safe_load(uncommented((ROOT / "etc" / "oproxy.yaml").read_text()))
EXAMPLE_KEYS = list(key_paths(EXAMPLE))
#: The keys beside which only a setting can stand (not a model name or option).
SETTINGS = [p for p in EXAMPLE_KEYS if not _FREE.search(dotted(p[:-1]))]


def test_the_example_file_has_its_commented_settings_put_back() -> None:
    keys = {dotted(p) for p in EXAMPLE_KEYS}
    assert {
        "models.gpt-4o-mini.fallbacks",
        "routing.circuit_breaker.cooldown",
        "auth.keys[0].model_limits",
        "auth.keys[1].key_sha256",
        "backends[2].api_key",
        "metrics.bearer_token",
        "sentry.dsn",
    } <= keys
    assert not any(k.startswith(("tcp", "ssl", "tls", "unix", "systemd")) for k in keys)


def test_the_example_file_loads_with_every_setting() -> None:
    config = parse_config(EXAMPLE, ENVIRON)
    assert [b.name for b in config.backends] == ["local", "gpu-box", "openai", "laptop", "hf"]
    assert [b.type for b in config.backends][3:] == ["lmstudio", "huggingface"]
    assert config.routing.rule_for("gpt-4o-mini") is not None
    assert config.metrics.token_sha256 is not None


@pytest.mark.parametrize("path", SETTINGS, ids=[dotted(p) for p in SETTINGS])
def test_an_unknown_key_beside_each_example_setting_is_refused(path: Path_) -> None:
    refuses_a_neighbour(EXAMPLE, path)


#: A reference entry: ````key```` (and a parenthesis) alone on its line,
#: sometimes two on one line.
_TERM = re.compile(r"^( *)``([a-z_]+)``( \(.*)?$")
_MORE_TERMS = re.compile(r", ``([a-z_]+)``( \([^)]*\))?")

#: The least a document needs to give a key its place: an entry for each
#: list and for ``models``, and what those entries require.
SEED: dict[str, Any] = {
    "backends": [{"url": "http://127.0.0.1:11434"}],
    "models": {"some-model": {}},
    "auth": {"keys": [{"name": "alice", "key": "sk-a"}]},
    "access_log": {"path": "/var/log/oproxy/access.log"},
    "certificates": {"acme": {"domains": ["gw.example.com"]}},
    "plugins": [{"name": "max-tokens-cap", "config": {"max_tokens": 64}}],
}
_ENTRY = {("backends",): 0, ("models",): "some-model", ("auth", "keys"): 0, ("plugins",): 0}


def documented_keys(text: str) -> Iterator[tuple[Path_, str]]:
    """
    Every key of the reference with what its entry says in parentheses,
    its path found from the indentation of the definition lists.
    """
    lines = text.splitlines()
    parents: list[tuple[int, Path_]] = []
    for index, line in enumerate(lines):
        term = _TERM.match(line)
        following = next((n for n in lines[index + 1 :] if n.strip()), "")
        indent = len(term.group(1)) if term else 0
        if not term or len(following) - len(following.lstrip()) <= indent:
            continue
        parents = [(i, p) for i, p in parents if i < indent]
        parent = parents[-1][1] if parents else ()
        own = _ENTRY.get(parent)
        where = parent if own is None else (*parent, own)
        given = [(term.group(2), term.group(3) or "")]
        given += _MORE_TERMS.findall(term.group(3) or "")
        for name, said in given:
            yield (*where, name), said
        parents.append((indent, (*where, given[0][0])))


REFERENCE = list(documented_keys((DOCS / "configuration.rst").read_text()))
REFERENCE_IDS = [dotted(p) for p, _ in REFERENCE]


def test_the_reference_documents_every_section() -> None:
    keys = set(REFERENCE_IDS)
    assert {"listen", "backends[0].host_header", "models.some-model.fallbacks"} <= keys
    assert {"limits.max_connections_per_client", "streaming.keepalive_interval"} <= keys
    assert {"state.namespace", "access_log.redact", "reload.interval"} <= keys
    assert len(keys) == len(REFERENCE) > 80


@pytest.mark.parametrize(("path", "said"), REFERENCE, ids=REFERENCE_IDS)
def test_every_key_of_the_reference_is_known(path: Path_, said: str) -> None:
    # Empty, it means its default, but a required key keeps its value.
    parse_config(placed(SEED, path, given(SEED, path)), ENVIRON)
    refuses_a_neighbour(SEED, path)


#: ``default ``32MiB````, ``default 64``; not ``default ``$SENTRY_DSN````.
_DEFAULT = re.compile(r"default (?:``([^`$<]+)``|(\d+)\b|(true|false)\b)")
DEFAULTS = [(p, m) for p, said in REFERENCE if (m := _DEFAULT.search(said))]


def literal(text: str) -> Any:
    """A default as the reference writes it: YAML, but ``oproxy:`` is a string."""
    value = yaml.safe_load(text)
    return text if isinstance(value, dict) and not text.startswith("{") else value


@pytest.mark.parametrize(
    ("path", "default"),
    [(p, literal(next(g for g in m.groups() if g))) for p, m in DEFAULTS],
    ids=[dotted(p) for p, _ in DEFAULTS],
)
def test_the_reference_says_the_defaults(path: Path_, default: Any) -> None:
    assert parse_config(placed(SEED, path, default), ENVIRON) == parse_config(SEED, ENVIRON)
