"""
The release as a user gets it: build the sdist and the wheel, check their
metadata with twine, install the wheel (not editable) into a fresh virtual
environment, and start ``twistd oproxy`` from it, away from the checkout.

It then asks the daemon what a user would: ``/healthz``, the models with a
key, and a chat completion answered by the fake Ollama (started from the
same installed wheel).  Any failure exits non-zero with the logs.

Run by ``.ci/run``; by hand: ``python .ci/check_release.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-release-check"


def run(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    print("+", " ".join(str(a) for a in argv), flush=True)
    done = subprocess.run(  # noqa: S603 - our own commands
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            sys.exit(f"{url}: the daemon exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - http on loopback
                return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"{url}: no answer in 60 s:\n{log.read_text()}")
            time.sleep(0.3)


def request(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    ask = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - loopback
    with urllib.request.urlopen(ask, timeout=30) as response:  # noqa: S310
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="oproxy-release-"))
    dist = work / "dist"
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, ROOT)
    artefacts = sorted(dist.iterdir())
    wheels = [p for p in artefacts if p.suffix == ".whl"]
    sdists = [p for p in artefacts if p.name.endswith(".tar.gz")]
    if len(wheels) != 1 or len(sdists) != 1:
        sys.exit(f"expected one wheel and one sdist, got {[p.name for p in artefacts]}")
    run(sys.executable, "-m", "twine", "check", "--strict", *artefacts)

    # A fresh virtual environment, away from the checkout and its .pth files.
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    bin_dir = venv / "bin"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environment["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    environment["XDG_STATE_HOME"] = str(work / "state")
    run(bin_dir / "pip", "install", "--quiet", wheels[0], env=environment)
    where = run(
        bin_dir / "python",
        "-c",
        "import oproxy, twisted.plugins.oproxy_plugin as p; print(oproxy.__file__, p.__file__)",
        cwd=work,
        env=environment,
    ).split()
    if not all(Path(w).is_relative_to(venv) for w in where):
        sys.exit(f"not imported from the wheel's install: {where}")
    version = run(bin_dir / "oproxy", "--version", cwd=work, env=environment).strip()
    print(version)

    fake_port, proxy_port = free_port(), free_port()
    config = work / "oproxy.yaml"
    config.write_text(
        f'listen: ["tcp:{proxy_port}:interface=127.0.0.1"]\n'
        "workers: 2\n"
        f'backends: [{{name: local, type: ollama, url: "http://127.0.0.1:{fake_port}"}}]\n'
        f'auth: {{keys: [{{name: release, key: "{KEY}"}}]}}\n'
    )
    processes: list[subprocess.Popen[bytes]] = []
    logs = {name: work / f"{name}.log" for name in ("fake", "oproxy")}
    try:
        for name, arguments in (
            ("fake", ["oproxy-fake-ollama", "--listen", f"tcp:{fake_port}:interface=127.0.0.1"]),
            ("oproxy", ["oproxy", "--config", str(config)]),
        ):
            argv = [str(bin_dir / "twistd"), "-n", "--pidfile=", f"--logfile={logs[name]}"]
            argv += arguments
            print("+", " ".join(argv), flush=True)
            processes.append(subprocess.Popen(argv, cwd=work, env=environment))  # noqa: S603
        base = f"http://127.0.0.1:{proxy_port}"
        wait_for(f"http://127.0.0.1:{fake_port}/api/version", processes[0], logs["fake"])
        wait_for(f"{base}/healthz", processes[1], logs["oproxy"])
        models = request(f"{base}/v1/models")
        names = [m["id"] for m in models["data"]]
        if "llama3.2:latest" not in names:
            sys.exit(f"/v1/models: {models}")
        reply = request(
            f"{base}/v1/chat/completions",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "released?"}]},
        )
        content = reply["choices"][0]["message"]["content"]
        if not content:
            sys.exit(f"empty answer: {reply}")
        print(f"{version} from the wheel in a fresh venv: /healthz, /v1/models, chat: ok")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
    if "Traceback" in logs["oproxy"].read_text():
        sys.exit(logs["oproxy"].read_text())
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
