"""
A new user's first run: ``oproxy serve``, ``python -m oproxy``, what the log
says at start (and does not say per connection), and ``twistd oproxy``
after the installs people really do (``pip install -e .``, ``pip install .``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import openai
import pytest

import twisted
from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

ROOT = Path(__file__).resolve().parents[2]

LISTENER_LINE = re.compile(
    r"oproxy \S+ serving the OpenAI API at (?P<url>\S+) \(docs /docs, metrics /metrics\)"
)
FACTORY_LINES = ("Starting factory", "Stopping factory")


class Output:
    """A process's output, read line by line as it comes."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def matching(self, pattern: str | re.Pattern[str]) -> list[str]:
        return [line for line in self.lines if re.search(pattern, line)]

    def wait_for_line(self, pattern: str | re.Pattern[str], seconds: float = 30.0) -> str:
        def seen() -> bool:
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.text}")
            return bool(self.matching(pattern))

        wait_for(seen, seconds)
        return self.matching(pattern)[0]

    def finish(self, seconds: float = 30.0) -> int:
        returncode = self.process.wait(seconds)
        self._reader.join(seconds)
        return returncode


def oproxy_serve(*args: str, cwd: Path) -> Output:
    """``python -m oproxy serve ...`` in its own process group, as a terminal runs it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "oproxy", "serve", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Output(process)


def served_url(output: Output) -> str:
    match = LISTENER_LINE.search(output.wait_for_line(LISTENER_LINE))
    assert match is not None
    return match.group("url")


def chat_a_few_times(base_url: str) -> None:
    """Requests that open upstream connections: listing models and chatting."""
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        assert client.models.list().data
        for stream in (False, True, False):
            reply = client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
            if stream:
                assert any(chunk.choices for chunk in reply)  # type: ignore[union-attr]
            else:
                assert reply.choices[0].message.content  # type: ignore[union-attr]


def test_version() -> None:
    for command in (
        [sys.executable, "-m", "oproxy", "--version"],
        [sys.executable, "-c", "from oproxy.cli import main; main()", "--version"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stdout) == (0, "oproxy 0.1.0\n")


def test_serve_in_the_foreground_says_where_and_nothing_per_connection(
    tmp_path: Path, fake_ollama_process: Daemon
) -> None:
    """
    ``oproxy serve`` on port 0: the log's first lines give the real URL and
    the backend's state; requests add access lines and no factory lines.
    """
    output = oproxy_serve(
        "--listen", "tcp:0:interface=127.0.0.1", "--backend", fake_ollama_process.url, cwd=tmp_path
    )
    try:
        url = served_url(output)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url) and not url.endswith(":0/v1")
        backend = output.wait_for_line(r"Backend local:")
        assert f"Backend local: Ollama at {fake_ollama_process.url} (reachable, " in backend
        assert re.search(r"\(reachable, \d+ models\)", backend)
        chat_a_few_times(url)
        wait_for(lambda: len(output.matching("POST /v1/chat/completions")) == 3)
    finally:
        output.process.terminate()
        output.finish()
    assert len(output.matching(LISTENER_LINE)) == 1
    assert not [line for line in output.lines if any(f in line for f in FACTORY_LINES)]
    assert "Traceback" not in output.text
    # In the foreground no pid file is left in the working directory.
    assert list(tmp_path.iterdir()) == []


def test_twistd_log_says_where_and_nothing_per_connection(
    tmp_path: Path, fake_ollama_process: Daemon
) -> None:
    port = free_port()
    daemon = start_twistd(
        [
            "oproxy",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--backend",
            fake_ollama_process.url,
        ],
        port,
        tmp_path,
        "fresh",
    )
    try:
        chat_a_few_times(f"{daemon.url}/v1")
        wait_for(lambda: "Backend local: Ollama" in daemon.log.read_text())
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert f"serving the OpenAI API at http://127.0.0.1:{port}/v1 (docs" in log
    assert not any(f in log for f in FACTORY_LINES), log


def test_serve_with_workers_says_it_once_and_stops_on_ctrl_c(
    tmp_path: Path, fake_ollama_process: Daemon
) -> None:
    """
    With workers the master gives the URL and one worker the backends' state,
    once each; Ctrl-C (SIGINT to the whole process group, as a terminal
    sends it) stops master and workers without a traceback.
    """
    config = tmp_path / "oproxy.yaml"
    config.write_text(
        f"""
listen: ["tcp:0:interface=127.0.0.1"]
backends: [{{name: local, type: ollama, url: "{fake_ollama_process.url}"}}]
workers: 2
"""
    )
    output = oproxy_serve("--config", str(config), cwd=tmp_path)
    try:
        url = served_url(output)
        assert output.matching(LISTENER_LINE)[0].endswith("with 2 worker processes")
        wait_for(lambda: len(output.matching(r"Worker \d serving")) == 2, 60)
        output.wait_for_line("Backend local: Ollama")
        chat_a_few_times(url)
        os.killpg(output.process.pid, signal.SIGINT)
        assert output.finish() in (0, -signal.SIGINT)
    finally:
        if output.process.poll() is None:
            os.killpg(output.process.pid, signal.SIGKILL)
    assert len(output.matching(LISTENER_LINE)) == 1
    assert len(output.matching("Backend local:")) == 1
    assert not [line for line in output.lines if any(f in line for f in FACTORY_LINES)]
    assert "Traceback" not in output.text, output.text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--config", "bad.yaml"], "invalid configuration in bad.yaml: backends[0].colour"),
        (["--uid", "no-such-user-here"], "name not found: 'no-such-user-here'"),
    ],
)
def test_serve_refuses_what_cannot_start_in_one_line(
    tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "bad.yaml").write_text(
        "backends:\n  - {name: x, url: 'http://127.0.0.1:1', colour: red}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "oproxy", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("oproxy serve: ") and says in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


# -- installs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What an sdist holds: the files an install reads, none of the test run's."""
    copy = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in ("setup.cfg", "pyproject.toml", "README.rst"):
        shutil.copy(ROOT / name, copy / name)
    for name in ("oproxy", "twisted"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    return copy


def isolated_venv(where: Path) -> tuple[Path, dict[str, str]]:
    """
    A virtualenv that sees this interpreter's libraries (Twisted and the
    rest, so nothing is downloaded) but not the ``.pth`` files there, which
    would put a checkout of oproxy already installed on its path.

    :return: its Python and the environment to run it in.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()
    # A plain directory line adds the directory and skips its .pth files.
    # Where Twisted really is, too: under a virtualenv with system site
    # packages that is the base interpreter's directory, not ``purelib``.
    libraries = dict.fromkeys(
        [ours["purelib"], ours["platlib"], str(Path(twisted.__file__).parents[1])]
    )
    Path(site, "zz-libraries.pth").write_text("".join(f"{path}\n" for path in libraries))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environment["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return python, environment


def pip_install(python: Path, environment: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environment,
    )
    assert done.returncode == 0, done.stdout + done.stderr


TWISTD_HELP = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
PLUGIN_FILE = (
    "from twisted.application.service import IServiceMaker; from twisted.plugin import "
    "getPlugins; import sys; [p for p in getPlugins(IServiceMaker) if p.tapname == 'oproxy']; "
    "print(getattr(sys.modules.get('twisted.plugins.oproxy_plugin'), '__file__', 'not found'))"
)


def what_twistd_finds(python: Path, environment: dict[str, str], cwd: Path) -> tuple[str, Path]:
    """``twistd --help`` in the virtualenv, and the file the oproxy plugin came from."""

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(python), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=environment,
            cwd=cwd,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    return run("-c", TWISTD_HELP, "--help"), Path(run("-c", PLUGIN_FILE).strip())


@pytest.fixture
def no_plugin_installed_here() -> None:
    installed = Path(sysconfig.get_paths()["purelib"], "twisted", "plugins", "oproxy_plugin.py")
    if installed.exists():
        pytest.skip(f"{installed} (an installed oproxy) would answer for the one under test")


def test_twistd_finds_the_plugin_after_a_default_editable_install(
    tmp_path: Path, project_copy: Path, no_plugin_installed_here: None
) -> None:
    python, environment = isolated_venv(tmp_path / "venv")
    pip_install(python, environment, "--editable", str(project_copy))
    help_text, plugin = what_twistd_finds(python, environment, tmp_path)
    assert re.search(r"^\s+oproxy\s+An OpenAI-compatible gateway", help_text, re.MULTILINE)
    assert plugin == project_copy / "twisted" / "plugins" / "oproxy_plugin.py"
    for command in ([str(python), "-m", "oproxy"], [str(python.parent / "oproxy")]):
        done = subprocess.run(
            [*command, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=environment,
            cwd=tmp_path,
        )
        assert (done.returncode, done.stdout) == (0, "oproxy 0.1.0\n"), done.stderr


def test_twistd_finds_the_plugin_after_an_install(
    tmp_path: Path, project_copy: Path, no_plugin_installed_here: None
) -> None:
    venv = tmp_path / "venv"
    python, environment = isolated_venv(venv)
    pip_install(python, environment, str(project_copy))
    help_text, plugin = what_twistd_finds(python, environment, tmp_path)
    assert re.search(r"^\s+oproxy\s+An OpenAI-compatible gateway", help_text, re.MULTILINE)
    assert plugin.is_relative_to(venv)
