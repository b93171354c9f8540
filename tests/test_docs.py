"""
The configuration examples in the docs load as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from oproxy.config import load_config

DOCS = Path(__file__).resolve().parent.parent / "docs"


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


def test_the_recipes_have_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[b.split("\n", 1)[0] for b in BLOCKS])
def test_every_recipe_loads(block: str) -> None:
    environ = {
        "ALICE_KEY": "sk-a",
        "CI_KEY": "sk-c",
        "ADMIN_KEY": "sk-admin",
        "OPENAI_API_KEY": "sk-upstream",
    }
    load_config(block, environ)
