"""
``docs/plugins.rst`` says what the code does: its configuration examples
load, each shipped plugin's options are the ones documented, and the
tutorial shows the very files the end-to-end test builds and installs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import attrs
import pytest

from oproxy.config import load_config
from oproxy.plugins.discovery import installed
from oproxy.plugins.interface import IPluginFactory
from tests.test_docs import yaml_blocks

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "plugins.rst").read_text()
EXAMPLE = ROOT / "docs" / "examples" / "oproxy-footer"


def tutorial_factory() -> IPluginFactory:
    spec = importlib.util.spec_from_file_location("oproxy_footer", EXAMPLE / "oproxy_footer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factory: IPluginFactory = module.factory
    return factory


def find(name: str) -> IPluginFactory:
    return tutorial_factory() if name == "footer" else installed().find(name)


BLOCKS = [b for b in yaml_blocks(DOC) if b.startswith("plugins:")]


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("block", BLOCKS, ids=[b.split("\n")[1].strip() for b in BLOCKS])
def test_every_example_loads(block: str) -> None:
    config = load_config(block, {"BILLING_TOKEN": "t"}, plugins=find)
    assert config.plugins


def documented_options(plugin: str) -> set[str]:
    """The terms of the definition list in a plugin's section."""
    section = DOC.split(f"``{plugin}``\n{'-' * (len(plugin) + 4)}\n", 1)[1]
    section = re.split(r"\n[^\n]+\n-{3,}\n|\nWriting a plugin\n", section, maxsplit=1)[0]
    terms = set()
    for line in section.splitlines():
        if line.startswith("``") and not line.startswith("``plugins"):
            terms.update(re.findall(r"``([a-z_]+)``(?: \([^)]*\))?(?:,|$)", line))
    return terms


@pytest.mark.parametrize("plugin", sorted(installed().factories))
def test_each_shipped_plugins_options_are_documented(plugin: str) -> None:
    options = installed().find(plugin).options
    assert options is not None
    assert documented_options(plugin) == {field.name for field in attrs.fields(options)}


def test_the_tutorial_includes_the_files_the_tests_install() -> None:
    for name in ("pyproject.toml", "oproxy_footer.py"):
        assert f".. literalinclude:: examples/oproxy-footer/{name}" in DOC
    assert 'footer = "oproxy_footer:factory"' in (EXAMPLE / "pyproject.toml").read_text()
    factory = tutorial_factory()
    assert factory.name == "footer" and factory.options is not None
