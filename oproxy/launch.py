"""
``oproxy serve``: the daemon, run by ``twistd``'s own machinery.

``twistd oproxy`` needs Twisted to find the plugin, which it looks for only
in ``twisted/plugins/`` directories on ``sys.path``; some installations
(an editable install by a finder hook, a zipapp) have none.  ``oproxy serve``
hands the service maker to ``twistd``'s option parser and application
runner directly, so what runs is exactly what ``twistd oproxy`` runs:
the same options object, makeService, workers, signals, drain and reload.

It runs in the foreground and logs to standard output unless told
otherwise, as people expect of a server started from a terminal or a
container.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

#: Where a daemon started with ``--daemon`` writes its pid and log by default.
DAEMON_PIDFILE = "oproxy.pid"
DAEMON_LOGFILE = "oproxy.log"


def add_serve_parser(commands: Any, default_config: str) -> None:
    """The ``serve`` subcommand of ``oproxy``: its own options and twistd's."""
    serve = commands.add_parser(
        "serve",
        help="run the daemon (in the foreground, logging to standard output)",
        description="Run the daemon: what `twistd -n oproxy` runs, without needing "
        "Twisted to find the plugin.",
    )
    ours = serve.add_argument_group("the daemon")
    ours.add_argument(
        "-c",
        "--config",
        default=os.environ.get("OPROXY_CONFIG"),
        metavar="FILE",
        help=f"YAML configuration file (default: $OPROXY_CONFIG, else {default_config} "
        "if it exists, else the embedded defaults)",
    )
    ours.add_argument(
        "-l",
        "--listen",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="a Twisted endpoint to serve on, e.g. tcp:8000:interface=127.0.0.1 "
        "(repeatable; replaces listen: from the file)",
    )
    ours.add_argument(
        "-b",
        "--backend",
        metavar="URL",
        help="an Ollama server; replaces backends: from the file",
    )
    process = serve.add_argument_group("the process (twistd's options)")
    process.add_argument(
        "--daemon",
        action="store_true",
        help=f"detach from the terminal (pid file {DAEMON_PIDFILE}, log file "
        f"{DAEMON_LOGFILE} unless given)",
    )
    process.add_argument("--pidfile", metavar="PATH", help="write the process id there")
    process.add_argument("--logfile", metavar="PATH", help="log to this file (rotated at 1 MB)")
    process.add_argument("--syslog", action="store_true", help="log to syslog")
    process.add_argument(
        "--logger",
        metavar="NAME",
        help="a log observer factory, e.g. oproxy.logs.json_observer for JSON lines",
    )
    process.add_argument("--uid", metavar="USER", help="run as this user once listening")
    process.add_argument("--gid", metavar="GROUP", help="run as this group once listening")
    process.add_argument("--umask", metavar="MASK", help="the file creation mask (octal)")


def twistd_arguments(arguments: argparse.Namespace, default_config: str) -> list[str]:
    """
    The ``twistd`` command line that means the same as ``arguments``, ending
    with the ``oproxy`` subcommand and its options.
    """
    config = config_to_serve(arguments.config, default_config)
    argv: list[str] = []
    if not arguments.daemon:
        argv.append("--nodaemon")
    pidfile = arguments.pidfile
    if pidfile is None:
        # In the foreground a pid file is clutter, and a stale one in the
        # working directory would refuse the next start.
        pidfile = DAEMON_PIDFILE if arguments.daemon else ""
    argv.append(f"--pidfile={pidfile}")
    logfile = arguments.logfile
    if logfile is None and arguments.daemon and not (arguments.syslog or arguments.logger):
        logfile = DAEMON_LOGFILE
    if logfile is not None:
        argv.append(f"--logfile={logfile}")
    if arguments.syslog:
        argv.append("--syslog")
    for option in ("logger", "uid", "gid", "umask"):
        value = getattr(arguments, option)
        if value is not None:
            argv.append(f"--{option}={value}")
    argv.append("oproxy")
    if config is not None:
        argv += ["--config", config]
    for endpoint in arguments.listen:
        argv += ["--listen", endpoint]
    if arguments.backend is not None:
        argv += ["--backend", arguments.backend]
    return argv


def config_to_serve(given: str | None, default_config: str) -> str | None:
    """The file ``oproxy serve`` reads, found as ``oproxy keys`` finds it."""
    if given is None and os.path.exists(default_config):
        return default_config
    return given


def serve(arguments: argparse.Namespace, default_config: str) -> NoReturn:
    """Run the daemon until it stops; exit as ``twistd`` would."""
    from twisted.python import usage
    from twisted.scripts import twistd

    from oproxy.service_makers import oproxy

    class ServeOptions(twistd.ServerOptions):  # type: ignore[misc,name-defined]
        """``twistd``'s options, with the daemon as the only subcommand."""

        @staticmethod
        def _getPlugins(interface: object) -> list[Any]:
            return [oproxy]

    options = ServeOptions()
    try:
        options.parseOptions(twistd_arguments(arguments, default_config))
    except (usage.UsageError, KeyError, ValueError) as e:
        # KeyError and ValueError: --uid or --gid naming nobody, a bad --umask.
        print(f"oproxy serve: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
    twistd.runApp(options)
    sys.exit(0)
