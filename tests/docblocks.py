"""
The code blocks of the documentation, as the tests run them.

A tutorial marks each of its ``.. code-block::`` directives with a comment
just before it, which Sphinx does not render::

    .. test: python expect="\\S"

    .. code-block:: python

       ...

and may say at its top what it needs before its first block::

    .. test-setup: fake-ollama 127.0.0.1:11434

    .. test-setup: hosts gpu-1.lan=127.0.1.1

A marker is a kind, arguments and ``key=value`` options, split as a shell
splits words.  The kinds (run by ``tests/test_tutorials.py`` in order, one
page at a time, in a network namespace of the page's own, so the ports and
host names the page shows are the ones used):

``file NAME``
    write the block to ``NAME`` in the page's directory;
``python``, ``node``, ``shell``
    run it (``shell`` with ``bash -euo pipefail``); it must exit 0;
``host-shell``
    run it outside the namespace (``npm install`` reaches the registry);
``background``
    start it and wait until ``port`` (on ``address``, default 127.0.0.1)
    accepts connections; it is stopped when the page is done;
``check NAME``
    hand the block to the check ``NAME`` of ``tests/tutorial_checks.py``,
    for configuration of programs that cannot run here (editors, web
    applications): the check reads it as the program does and makes the
    requests the program makes;
``skip REASON``
    not run, for the reason given (which says what covers it instead).

Options: ``expect=REGEX`` (searched in the output), ``retry=SECONDS`` (run
again until it passes, for something that takes a while to show),
``needs=PROGRAM[,PROGRAM]`` (skipped outside CI when one is missing; in CI
a missing program is a failure).

Setups: ``fake-ollama ADDRESS:PORT...`` (the fake Ollama on each),
``oproxy [ARGS]`` (``oproxy serve ARGS`` on 127.0.0.1:8000), ``hosts
NAME=ADDRESS...`` (entries of the namespace's ``/etc/hosts``).

A page whose setup is ``compose`` is run by ``tests/e2e/test_compose.py``
against the Compose stack it starts, which also knows ``compose-exec``
(``docker compose exec SERVICE COMMAND``, run with the service's
environment).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_MARKER = re.compile(r"^\.\. test: (?P<spec>.+)$")
_SETUP = re.compile(r"^\.\. test-setup: (?P<spec>.+)$")
_CODE = re.compile(r"^\.\. (?:code-block|code|sourcecode)::\s*(?P<language>\S*)\s*$")
_LITERAL_INTRO = re.compile(r"(?<!:)::\s*$")

KINDS = {
    "file",
    "python",
    "node",
    "shell",
    "host-shell",
    "background",
    "check",
    "skip",
    "compose-exec",
}


@dataclass
class Block:
    page: str
    line: int
    language: str
    kind: str
    args: list[str]
    options: dict[str, str]
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Page:
    path: str
    setups: list[list[str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    unmarked: list[int] = field(default_factory=list)

    def setup(self, kind: str) -> list[list[str]]:
        return [s[1:] for s in self.setups if s[0] == kind]


def split_spec(spec: str) -> tuple[str, list[str], dict[str, str]]:
    kind, _, rest_of_line = spec.partition(" ")
    if kind == "skip":
        return kind, [rest_of_line.strip()], {}
    rest = shlex.split(rest_of_line)
    args = [w for w in rest if "=" not in w or w.startswith(("/", "."))]
    options = dict(w.split("=", 1) for w in rest if w not in args)
    return kind, args, options


def _content(lines: list[str], start: int) -> tuple[str, int]:
    """The indented body starting after ``start`` (options skipped), and where it ends."""
    index = start + 1
    while index < len(lines) and re.match(r"^\s+:\w[\w-]*:", lines[index]):
        index += 1
    body: list[str] = []
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
        body.append(lines[index])
        index += 1
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
    return "\n".join(b[indent:] for b in body) + "\n", index


def read_page(path: Path) -> Page:
    relative = path.relative_to(DOCS).as_posix()
    lines = path.read_text().splitlines()
    page = Page(relative)
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines):
        if match := _SETUP.match(line):
            page.setups.append(shlex.split(match.group("spec")))
        elif match := _MARKER.match(line):
            if pending is not None:
                raise ValueError(f"{relative}:{pending[0] + 1}: a test marker with no block")
            pending = (number, match.group("spec"))
        elif match := _CODE.match(line):
            text, _ = _content(lines, number)
            if pending is None:
                page.unmarked.append(number + 1)
                continue
            kind, args, options = split_spec(pending[1])
            if kind not in KINDS:
                raise ValueError(f"{relative}:{pending[0] + 1}: unknown kind {kind!r}")
            page.blocks.append(
                Block(relative, number + 1, match.group("language"), kind, args, options, text)
            )
            pending = None
        elif pending is not None and line.strip():
            raise ValueError(f"{relative}:{pending[0] + 1}: a test marker not followed by a block")
    if pending is not None:
        raise ValueError(f"{relative}:{pending[0] + 1}: a test marker with no block")
    return page


#: The pages whose code blocks are all run: the tutorials and the start.
def tutorial_paths() -> list[Path]:
    return [DOCS / "getting-started.rst", *sorted((DOCS / "tutorials").glob("*.rst"))]


def tutorial_pages() -> list[Page]:
    return [read_page(path) for path in tutorial_paths()]
