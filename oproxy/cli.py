"""
``oproxy``: the daemon's command line.

``oproxy serve`` runs the daemon (what ``twistd -n oproxy`` runs, see
:mod:`oproxy.launch`); ``python -m oproxy`` is the same command.

``oproxy keys create|list|show|revoke|rotate`` manage the keys kept in the
state store (the same store the daemon reads, found through the same
config file); ``oproxy certs local|ca-path|status`` the local CA and the
certificate directory (:mod:`oproxy.certs.commands`); ``oproxy check-config
FILE`` validates a config file without starting anything.  A new or rotated
key is printed once and never again: only the SHA-256 of its secret is
stored.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.internet import defer, task

from oproxy import __version__, launch
from oproxy.certs import commands as certificates
from oproxy.config import Config, ConfigError, default_state_path, load_config, parse_expiry
from oproxy.security import keys
from oproxy.security.limits import periods
from oproxy.security.policy import (
    MODEL_LIMIT_NAMES,
    KeyPolicy,
    Limits,
    PolicyError,
    limits_to_json,
    parse_network,
    policy_from_json,
)
from oproxy.security.records import (
    NAME_RULE,
    check_key_name,
    create_key,
    describe,
    revoke_key,
    rotate_key,
    shown_name,
    status,
)
from oproxy.state.base import IStateStore, KeyRecord, StateUnavailable
from oproxy.state.opening import open_store

#: Where the command line looks for the daemon's config when not told.
DEFAULT_CONFIG = "/etc/oproxy/oproxy.yaml"

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CommandError(Exception):
    """A problem the user can fix; printed without a traceback."""


def main(argv: Sequence[str] | None = None) -> None:
    """The ``oproxy`` console script."""
    arguments = parser().parse_args(argv)
    if arguments.command == "serve":
        launch.serve(arguments, DEFAULT_CONFIG)
    try:
        if arguments.command == "check-config":
            sys.exit(check_config(arguments.file, sys.stdout))
        config = _config(arguments.config)
        if config.state.backend == "sqlite" or arguments.command == "certs":
            check_owner(config.state.path or default_state_path(os.environ), os.geteuid())
        if arguments.command == "certs":
            sys.exit(certificates.run(arguments, config, sys.stdout, sys.stderr, time.time()))
    except CommandError as e:
        print(f"oproxy: {e}", file=sys.stderr)
        sys.exit(2)

    async def run(reactor: Any) -> None:
        store = open_store(config.state, reactor)
        try:
            status = await keys_command(arguments, store, reactor.seconds(), sys.stdout)
        except (CommandError, StateUnavailable) as e:
            print(f"oproxy: {e}", file=sys.stderr)
            status = 1
        finally:
            await store.close()
        if status:
            raise SystemExit(status)  # task.react exits with it

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="oproxy", description=__doc__.split("\n\n")[0])
    top.add_argument("--version", action="version", version=f"oproxy {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    launch.add_serve_parser(commands, DEFAULT_CONFIG)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", help="the YAML file to check")
    key_parser = commands.add_parser("keys", help="manage API keys in the state store")
    key_parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("OPROXY_CONFIG"),
        help=f"the daemon's config file, for its state: section (default: {DEFAULT_CONFIG} "
        "if it exists, else the embedded defaults)",
    )
    actions = key_parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key and print it (once)")
    create.add_argument(
        "name", type=_key_name, help=f"a name for the key (shown in logs and metrics): {NAME_RULE}"
    )
    _policy_options(create)
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="a key's policy and usage")
    show.add_argument("key", help="the key's id or name")
    show.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("key", help="the key's id or name")
    rotate = actions.add_parser("rotate", help="give a key a new secret (the old one stops)")
    rotate.add_argument("key", help="the key's id or name")
    certificates.add_parser(
        commands,
        f"the daemon's config file, for its state and certificates (default: {DEFAULT_CONFIG} "
        "if it exists, else the embedded defaults)",
    )
    return top


def _key_name(text: str) -> str:
    """A new key's name, checked while parsing: a bad one exits with status 2."""
    try:
        return check_key_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{shown_name(text)}: {e}") from None


def _policy_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--models", nargs="+", default=[], metavar="GLOB")
    command.add_argument("--networks", nargs="+", default=[], metavar="CIDR")
    command.add_argument("--expires", help="a date (2027-01-31), a time, or a duration (30d, 12h)")
    for name in ("rpm", "tpm", "max-parallel", "daily-tokens", "monthly-tokens"):
        command.add_argument(f"--{name}", type=int, metavar="N")
    command.add_argument(
        "--model-limit",
        action="append",
        default=[],
        metavar="GLOB:rpm=N,tpm=N",
        help="rpm/tpm for this key and each model matching GLOB (repeatable)",
    )
    command.add_argument("--admin", action="store_true", help="may manage keys and models")


def check_config(path: str, out: TextIO) -> int:
    """Validate ``path`` as the daemon would; 0 when it would start."""
    try:
        with open(path, encoding="utf-8") as f:
            config = load_config(f.read(), os.environ)
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    except ConfigError as e:
        print(f"{path}: {e}", file=out)
        return 1
    print(
        f"{path}: valid ({len(config.backends)} backend(s), {len(config.listen)} listener(s), "
        f"{len(config.auth.keys)} key(s) in the file)",
        file=out,
    )
    return 0


def check_owner(database: str, euid: int) -> None:
    """
    Refuse to run as root on a state directory that belongs to the daemon's
    user: a database (or its WAL file) made by root would lock the daemon out.
    """
    directory = os.path.dirname(os.path.abspath(database))
    try:
        owner = os.stat(directory).st_uid
    except OSError:
        return
    if euid == 0 and owner != 0:
        try:
            import pwd

            user = pwd.getpwuid(owner).pw_name
        except (ImportError, KeyError):
            user = str(owner)
        raise CommandError(
            f"{directory} belongs to {user}: run this as that user "
            f"(sudo -u {user} oproxy keys ...), so the daemon can still open its database"
        )


def _config(path: str | None) -> Config:
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    text = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CommandError(f"{path}: {e.strerror}") from None
    try:
        return load_config(text, os.environ)
    except ConfigError as e:
        raise CommandError(f"{path or 'defaults'}: {e}") from None


async def keys_command(
    arguments: argparse.Namespace, store: IStateStore, now: float, out: TextIO
) -> int:
    """Run one ``oproxy keys`` action against ``store``; the exit status."""
    if arguments.action == "create":
        return await _create(arguments, store, now, out)
    if arguments.action == "list":
        for record in await store.list_keys():
            line = json.dumps(describe(record, now)) if arguments.json else _line(record, now)
            print(line, file=out)
        return 0
    record = await _find(store, arguments.key)
    if arguments.action == "show":
        return await _show(record, arguments.json, store, now, out)
    if arguments.action == "revoke":
        await revoke_key(store, record, now)
        print(f"key {record.key_id} ({shown_name(record.name)}) revoked", file=out)
        return 0
    try:
        issued, _ = await rotate_key(store, record)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(issued.token, file=out)
    _note(
        f"key {record.key_id} ({shown_name(record.name)}) rotated; the old secret no longer works"
    )
    return 0


async def _create(
    arguments: argparse.Namespace, store: IStateStore, now: float, out: TextIO
) -> int:
    policy = policy_from_arguments(arguments, now)
    try:
        issued, _ = await create_key(store, arguments.name, policy, now)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(issued.token, file=out)
    _note(f"key {issued.key_id} ({arguments.name}) created; it is shown only this once")
    return 0


async def _show(
    record: KeyRecord, as_json: bool, store: IStateStore, now: float, out: TextIO
) -> int:
    summary = describe(record, now)
    day, _, month, _ = periods(now)
    subject = f"key:{record.key_id}"
    summary["usage"] = {
        "daily_tokens": await store.quota_used(f"{subject}:day:{day}"),
        "monthly_tokens": await store.quota_used(f"{subject}:month:{month}"),
    }
    if as_json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        for name, value in summary.items():
            print(f"{name}: {json.dumps(value)}", file=out)
    return 0


def _note(text: str) -> None:
    """Say something to the person at the terminal, not to a pipe."""
    print(f"# {text}", file=sys.stderr)


async def _find(store: IStateStore, wanted: str) -> KeyRecord:
    if keys.looks_like_key_id(wanted):
        record = await store.get_key(wanted)
        if record is not None:
            return record
    for record in await store.list_keys():
        if record.name == wanted:
            return record
    raise CommandError(f"no key with the id or name {wanted!r}")


def policy_from_arguments(arguments: argparse.Namespace, now: float) -> KeyPolicy:
    try:
        limits = Limits(
            rpm=_positive(arguments.rpm, "--rpm"),
            tpm=_positive(arguments.tpm, "--tpm"),
            max_parallel=_positive(arguments.max_parallel, "--max-parallel"),
            daily_tokens=_positive(arguments.daily_tokens, "--daily-tokens"),
            monthly_tokens=_positive(arguments.monthly_tokens, "--monthly-tokens"),
        )
        return KeyPolicy(
            models=tuple(arguments.models),
            networks=tuple(parse_network(n) for n in arguments.networks),
            expires=_expiry(arguments.expires, now) if arguments.expires else None,
            limits=limits,
            model_limits=tuple(_model_limit(text) for text in arguments.model_limit),
            admin=arguments.admin,
        )
    except PolicyError as e:
        raise CommandError(str(e)) from None


def _positive(value: int | None, option: str) -> int | None:
    if value is not None and value < 1:
        raise CommandError(f"{option} must be a positive number")
    return value


def _expiry(text: str, now: float) -> float:
    duration = _DURATION.match(text.strip())
    if duration:
        return now + int(duration.group(1)) * _UNITS[duration.group(2)]
    try:
        return parse_expiry(text)
    except ValueError:
        raise CommandError(
            f"--expires {text!r}: give a date (2027-01-31), a time, or a duration (30d)"
        ) from None


def _model_limit(text: str) -> tuple[str, Limits]:
    pattern, _, settings = text.rpartition(":")
    if not pattern:
        raise CommandError(f"--model-limit {text!r}: write GLOB:rpm=N,tpm=N")
    values: dict[str, int] = {}
    for part in settings.split(","):
        name, _, number = part.partition("=")
        if name.strip() not in MODEL_LIMIT_NAMES or not number.strip().isdigit():
            raise CommandError(f"--model-limit {text!r}: write GLOB:rpm=N,tpm=N")
        values[name.strip()] = int(number)
    return pattern, Limits(**values)


def _line(record: KeyRecord, now: float) -> str:
    policy = policy_from_json(record.policy)
    extras = ["admin"] if policy.admin else []
    if policy.models:
        extras.append("models=" + ",".join(policy.models))
    extras += [f"{name}={value}" for name, value in limits_to_json(policy.limits).items()]
    state = status(record, now)
    name = shown_name(record.name)
    return f"{record.key_id}  {name:<20} {state:<8} {' '.join(extras)}".rstrip()
