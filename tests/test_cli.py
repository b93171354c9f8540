"""
The ``oproxy`` command line: ``--version``, ``serve``, ``check-config`` and ``keys``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted

from oproxy.cli import check_config, keys_command, parser
from oproxy.launch import config_to_serve, twistd_arguments
from oproxy.security.keys import hash_key, parse_token
from oproxy.security.policy import KeyPolicy
from oproxy.security.records import new_key
from oproxy.state.sqlite import SQLiteStore


def test_check_config_accepts_a_good_file_and_names_the_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("backends: [{name: a, url: 'http://127.0.0.1:11434'}]\n")
    out = io.StringIO()
    assert check_config(str(good), out) == 0
    assert "valid" in out.getvalue()
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: {strategy: random}\n")
    out = io.StringIO()
    assert check_config(str(bad), out) == 1
    assert "routing.strategy" in out.getvalue()


def test_check_config_is_a_console_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: tcp:8000\n")  # beyond loopback, no keys
    done = subprocess.run(
        [sys.executable, "-c", "from oproxy.cli import main; main()", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "auth" in done.stdout


async def run(store: SQLiteStore, *argv: str) -> tuple[int, str]:
    arguments = parser().parse_args(["keys", *argv])
    out = io.StringIO()
    status = await keys_command(arguments, store, 1_800_000_000.0, out)
    return status, out.getvalue()


@pytest_twisted.ensureDeferred
async def test_keys_lifecycle(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    try:
        status, printed = await run(
            store,
            "create",
            "ci",
            "--models",
            "llama3*",
            "--rpm",
            "60",
            "--expires",
            "30d",
            "--model-limit",
            "qwen*:rpm=5,tpm=100",
        )
        assert status == 0
        key_id, secret = parse_token(printed.strip()) or ("", "")
        record = await store.get_key(key_id)
        assert record is not None and record.secret_sha256 == hash_key(secret)
        assert record.policy["limits"] == {"rpm": 60}
        assert record.policy["model_limits"] == {"qwen*": {"rpm": 5, "tpm": 100}}
        assert record.policy["expires"] == 1_800_000_000.0 + 30 * 86400

        status, listing = await run(store, "list")
        assert key_id in listing and "active" in listing and secret not in listing
        status, _ = await run(store, "rotate", "ci")
        assert (await store.get_key(key_id)).secret_sha256 != hash_key(secret)  # type: ignore[union-attr]
        status, printed = await run(store, "revoke", key_id)
        assert "revoked" in printed
        status, listing = await run(store, "list", "--json")
        assert '"status": "revoked"' in listing
        with pytest.raises(Exception, match="already exists"):
            await run(store, "create", "ci")
        with pytest.raises(Exception, match="GLOB:rpm=N"):
            await run(store, "create", "other", "--model-limit", "qwen*:burst=5")
    finally:
        await store.close()


def test_root_is_kept_off_the_daemons_state_directory(tmp_path: Path) -> None:
    import os

    from oproxy.cli import CommandError, check_owner

    database = str(tmp_path / "state.db")
    mine = os.stat(tmp_path).st_uid
    check_owner(database, euid=mine)  # the owner itself: fine
    if mine != 0:
        with pytest.raises(CommandError, match="sudo -u"):
            check_owner(database, euid=0)
    else:
        os.chown(tmp_path, 12345, -1)
        with pytest.raises(CommandError, match="sudo -u 12345"):
            check_owner(database, euid=0)
        os.chown(tmp_path, 0, -1)
    check_owner(str(tmp_path / "missing" / "state.db"), euid=0)  # nothing there yet


@pytest.mark.parametrize(
    "name",
    ["x\ny", "n" * 100_000, "two words", "", "esc\x1b[2J"],
    ids=["newline", "huge", "space", "empty", "escape"],
)
def test_keys_create_refuses_unreadable_names(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["keys", "create", name])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "a key name must be 1 to 64 characters" in error
    assert "\x1b" not in error and len(error) < 1000


CLI = (sys.executable, "-c", "from oproxy.cli import main; main()")


def test_keys_create_refuses_a_bad_name_before_touching_anything(tmp_path: Path) -> None:
    config = tmp_path / "oproxy.yaml"
    config.write_text(f"state: {{path: {tmp_path / 'state.db'}}}\n")
    done = subprocess.run(
        [*CLI, "keys", "--config", str(config), "create", "bad\nname"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "'bad\\nname': a key name must be" in done.stderr
    assert not (tmp_path / "state.db").exists()


@pytest_twisted.ensureDeferred
async def test_keys_with_old_unchecked_names_still_list_show_and_revoke(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    try:
        odd = "old\nkey\x1b[31m" + "x" * 100
        issued, record = new_key("placeholder", KeyPolicy(), 1_700_000_000.0)
        await store.add_key(replace(record, name=odd))
        status, listing = await run(store, "list")
        assert status == 0 and issued.key_id in listing
        assert listing.count("\n") == 1 and "\x1b" not in listing
        assert "'old\\nkey\\x1b[31m" in listing
        status, shown = await run(store, "show", issued.key_id)
        assert status == 0 and "\x1b" not in shown
        status, printed = await run(store, "revoke", issued.key_id)
        assert status == 0 and "revoked" in printed and "\x1b" not in printed
        assert (await store.get_key(issued.key_id)).revoked is not None  # type: ignore[union-attr]
        status, listing = await run(store, "list", "--json")
        assert json.loads(listing)["name"] == odd
    finally:
        await store.close()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == "oproxy 0.1.0\n"


NO_SYSTEM_CONFIG = "/nonexistent/oproxy.yaml"


def serve_arguments(*argv: str) -> list[str]:
    return twistd_arguments(parser().parse_args(["serve", *argv]), NO_SYSTEM_CONFIG)


def test_serve_runs_in_the_foreground_without_a_pid_file_by_default() -> None:
    assert serve_arguments() == ["--nodaemon", "--pidfile=", "oproxy"]
    assert serve_arguments("-c", "o.yaml", "-l", "tcp:1", "-l", "unix:/s", "-b", "h:1") == [
        "--nodaemon",
        "--pidfile=",
        "oproxy",
        "--config",
        "o.yaml",
        "--listen",
        "tcp:1",
        "--listen",
        "unix:/s",
        "--backend",
        "h:1",
    ]


def test_serve_passes_twistds_options_on() -> None:
    assert serve_arguments("--daemon") == [
        "--pidfile=oproxy.pid",
        "--logfile=oproxy.log",
        "oproxy",
    ]
    assert serve_arguments("--daemon", "--syslog", "--pidfile=/run/o.pid") == [
        "--pidfile=/run/o.pid",
        "--syslog",
        "oproxy",
    ]
    assert serve_arguments("--logfile", "-", "--logger", "oproxy.logs.json_observer") == [
        "--nodaemon",
        "--pidfile=",
        "--logfile=-",
        "--logger=oproxy.logs.json_observer",
        "oproxy",
    ]
    assert serve_arguments("--uid", "oproxy", "--gid", "oproxy", "--umask", "022")[2:5] == [
        "--uid=oproxy",
        "--gid=oproxy",
        "--umask=022",
    ]


def test_serve_reads_the_file_the_keys_command_reads(tmp_path: Path) -> None:
    assert config_to_serve("given.yaml", str(tmp_path / "missing.yaml")) == "given.yaml"
    assert config_to_serve(None, str(tmp_path / "missing.yaml")) is None
    system = tmp_path / "oproxy.yaml"
    system.write_text("{}\n")
    assert config_to_serve(None, str(system)) == str(system)
    implied = twistd_arguments(parser().parse_args(["serve"]), str(system))
    assert implied[-3:] == ["oproxy", "--config", str(system)]
