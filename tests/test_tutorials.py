"""
Every code block of the tutorials (and of Getting started) is run.

Each page runs in a network namespace of its own (``tests/sandbox.py``),
so the ports and host names it shows are the ones used: ``oproxy serve``
on 127.0.0.1:8000, the fake Ollama on 11434, ``gpu-1.lan``.  Blocks run in
the page's order, in one directory, as a reader would run them; the markers
that say how (``.. test: python``, ...) are described in
``tests/docblocks.py``.  So a tutorial that stops working fails here, and
the docs cannot drift from what the code does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docblocks import ROOT, Block, Page, tutorial_pages
from tests.sandbox import Namespace, in_ci

PAGES = tutorial_pages()

#: Variables of the test run that would steer the clients the pages show.
_STEERING = ("OPENAI_", "OLLAMA_", "OPROXY_")


def environment(workdir: Path) -> dict[str, str]:
    """What the blocks run with: this run's environment, minus what would steer a client."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STEERING)}
    # Python blocks import files written beside them (``from client import client``).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir), env.get("PYTHONPATH")]))
    env["HOME"] = str(workdir)
    env["NO_PROXY"] = "*"
    return env


def test_every_code_block_is_marked() -> None:
    """A block with no marker would never run: every one says how it is tested."""
    unmarked = [f"{page.path}:{line}" for page in PAGES for line in page.unmarked]
    assert not unmarked, f"code blocks without a '.. test:' marker: {unmarked}"


def test_skips_say_why() -> None:
    for page in PAGES:
        for block in page.blocks:
            if block.kind == "skip":
                assert len(block.args[0]) > 20, f"{block.id}: say what covers it instead"


def test_the_tutorials_are_in_the_site() -> None:
    index = (ROOT / "docs" / "index.rst").read_text()
    for page in PAGES:
        assert re.search(rf"^\s+{re.escape(page.path[:-4])}$", index, re.MULTILINE), page.path


class PageRun:
    """One page's blocks, run in order inside its namespace."""

    def __init__(self, page: Page, workdir: Path) -> None:
        self.page = page
        self.workdir = workdir
        hosts = dict(entry.split("=", 1) for setup in page.setup("hosts") for entry in setup)
        self.namespace = Namespace(workdir, hosts)
        self.env = environment(workdir)
        self.background: list[subprocess.Popen[bytes]] = []
        self.skipped: list[str] = []

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, argv: list[str], port: int, address: str, name: str) -> None:
        log = self.log(name)
        process = self.namespace.start(argv, log=log, env=self.env, cwd=self.workdir)
        self.background.append(process)
        self.namespace.wait_for_port(port, address, process=process, log=log)

    def set_up(self) -> None:
        for setup in self.page.setup("fake-ollama"):
            for where in setup:
                address, port = where.rsplit(":", 1)
                self.start(
                    [
                        shutil.which("twistd") or "twistd",
                        "-n",
                        "--pidfile=",
                        "--logfile=-",
                        "oproxy-fake-ollama",
                        "--listen",
                        f"tcp:{port}:interface={address}",
                    ],
                    int(port),
                    address,
                    f"fake-ollama-{address}",
                )
        for setup in self.page.setup("oproxy"):
            self.start(["oproxy", "serve", *setup], 8000, "127.0.0.1", "oproxy")

    def run(self, block: Block, node_modules: Path | None) -> None:
        needs = [p for p in block.options.get("needs", "").split(",") if p]
        if block.kind == "skip":
            return
        missing = [p for p in needs if shutil.which(p) is None]
        if missing:
            # The page goes on without it; the test is skipped at the end.
            self.skipped.append(f"{block.id} needs {', '.join(missing)}")
            return
        handler = getattr(self, "run_" + block.kind.replace("-", "_"))
        handler(block, node_modules)

    def run_file(self, block: Block, node_modules: Path | None) -> None:
        (self.workdir / block.args[0]).write_text(block.text)

    def run_background(self, block: Block, node_modules: Path | None) -> None:
        port = int(block.options["port"])
        address = block.options.get("address", "127.0.0.1")
        self.start(["bash", "-c", block.text], port, address, f"block-{block.line}")

    def _finish(self, block: Block, argv: list[str], inside: bool = True) -> None:
        deadline = time.monotonic() + float(block.options.get("retry", 0))
        while True:
            if inside:
                done = self.namespace.run(argv, cwd=self.workdir, env=self.env)
            else:
                done = subprocess.run(
                    argv,
                    cwd=self.workdir,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
            output = done.stdout + done.stderr
            expected = block.options.get("expect")
            passed = done.returncode == 0 and (
                expected is None or re.search(expected, output, re.MULTILINE) is not None
            )
            if passed:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {log.name}\n{log.read_text()[-3000:]}"
                    for log in sorted(self.workdir.glob("*.log"))
                )
                raise AssertionError(
                    f"{block.id} ({block.kind}) exited {done.returncode}, "
                    f"expected {expected!r}:\n{block.text}\n--- output\n{output}\n{logs}"
                )
            time.sleep(1)

    def run_shell(self, block: Block, node_modules: Path | None) -> None:
        self._finish(block, ["bash", "-euo", "pipefail", "-c", block.text])

    def run_host_shell(self, block: Block, node_modules: Path | None) -> None:
        if node_modules is not None and block.text.strip() == "npm install openai":
            # Installed once for the session (from the registry, as this block does).
            (self.workdir / "node_modules").symlink_to(node_modules)
            return
        self._finish(block, ["bash", "-euo", "pipefail", "-c", block.text], inside=False)

    def run_python(self, block: Block, node_modules: Path | None) -> None:
        script = self.workdir / f"block_{block.line}.py"
        script.write_text(block.text)
        self._finish(block, [sys.executable, script.name])

    def run_node(self, block: Block, node_modules: Path | None) -> None:
        script = self.workdir / f"block_{block.line}.mjs"
        script.write_text(block.text)
        self._finish(block, ["node", script.name])

    def run_check(self, block: Block, node_modules: Path | None) -> None:
        source = self.workdir / f"block_{block.line}.txt"
        source.write_text(block.text)
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from tests import tutorial_checks; "
            "getattr(tutorial_checks, sys.argv[3])(open(sys.argv[2]).read())"
        )
        check = block.args[0].replace("-", "_")
        self._finish(block, [sys.executable, "-c", code, str(ROOT), source.name, check])

    def close(self) -> None:
        self.namespace.close()


@pytest.fixture(scope="session")
def npm_openai(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """
    The Node SDK, installed once with ``npm install openai`` into a
    directory of the test run's; ``None`` when npm is missing (outside CI).
    """
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None
    where = tmp_path_factory.mktemp("npm")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", "openai"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        message = f"npm install openai failed: {done.stderr[-2000:]}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return where / "node_modules"


RUNNABLE = [page for page in PAGES if not page.setup("compose")]


@pytest.mark.parametrize("page", RUNNABLE, ids=[page.path for page in RUNNABLE])
def test_tutorial(page: Page, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    node = (
        request.getfixturevalue("npm_openai")
        if any(b.kind == "node" for b in page.blocks)
        else None
    )
    run = PageRun(page, tmp_path)
    try:
        run.set_up()
        for block in page.blocks:
            run.run(block, node)
    finally:
        run.close()
    if run.skipped:
        message = "not installed, so not run: " + "; ".join(run.skipped)
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
