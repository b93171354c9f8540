"""
``oproxy certs``: the local CA and the certificate directory from the shell.

``oproxy certs local NAME_OR_IP...`` makes the CA the first time and a
certificate for those names into the directory the ``tls:`` listener
serves (a running daemon picks it up); ``oproxy certs ca-path`` prints the
CA's certificate file on standard output (so ``$(oproxy certs ca-path)``
works) and, on standard error, how to trust it; ``oproxy certs status``
lists what the directory holds.  They find the state directory and the
certificate directory through the daemon's config file, as ``oproxy keys``
does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any, TextIO

from oproxy.certs.files import iso
from oproxy.certs.local import LocalCA, LocalCAError, ca_directory
from oproxy.certs.report import CertificateReport, status_path
from oproxy.config import Config, ConfigError
from oproxy.config.certificates import name_or_address, state_directory


def add_parser(commands: Any, config_help: str) -> None:
    """The ``certs`` subcommand of ``oproxy``."""
    certs = commands.add_parser(
        "certs",
        help="HTTPS certificates: a local CA for LAN names, and what the directory holds",
    )
    certs.add_argument("-c", "--config", default=os.environ.get("OPROXY_CONFIG"), help=config_help)
    actions = certs.add_subparsers(dest="action", required=True)
    local = actions.add_parser(
        "local",
        help="make a certificate for these names and IP addresses from the local CA "
        "(the CA is made the first time)",
    )
    local.add_argument("names", nargs="+", metavar="NAME_OR_IP", type=_name)
    actions.add_parser("ca-path", help="print the local CA's certificate file, and how to trust it")
    status = actions.add_parser(
        "status", help="the certificates in the directory: names, issuer, expiry, days left"
    )
    status.add_argument("--json", action="store_true", help="one JSON document")


def _name(text: str) -> str:
    try:
        return name_or_address(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.problem) from None


def run(arguments: argparse.Namespace, config: Config, out: TextIO, err: TextIO, now: float) -> int:
    """Run one ``oproxy certs`` action; the exit status."""
    state = state_directory(config.state.path)
    ca = LocalCA(ca_directory(state))
    directory = config.certificates.directory
    try:
        if arguments.action == "local":
            return _local(ca, tuple(dict.fromkeys(arguments.names)), directory, now, out)
        if arguments.action == "ca-path":
            return _ca_path(ca, out, err)
    except (LocalCAError, OSError) as e:
        print(f"oproxy: {e}", file=err)
        return 1
    report = CertificateReport(directory, status_path(state))
    return _status(report, directory, now, arguments.json, out)


def _local(ca: LocalCA, names: tuple[str, ...], directory: str, now: float, out: TextIO) -> int:
    made = not ca.exists()
    held = ca.issue(names, directory, datetime.datetime.fromtimestamp(now, datetime.UTC))
    if made:
        print(f"Made the local CA: {ca.certificate_path}", file=out)
    print(
        f"Certificate for {', '.join(held.names)}, valid until {iso(held.not_after)}: {held.path}",
        file=out,
    )
    print(f'Serve it:         oproxy serve --listen "tls:{directory}:port=8443"', file=out)
    print("Trust the CA:     oproxy certs ca-path   (says how, for each system)", file=out)
    return 0


def trust_instructions(path: str) -> str:
    """How to trust the CA at ``path``, on each system and for single programs."""
    name = os.path.basename(path)
    return f"""\
# The local CA's certificate is {path}
# Copy it to each machine that calls oproxy, then trust it there:
#   Debian, Ubuntu:  sudo cp {name} /usr/local/share/ca-certificates/oproxy-ca.crt
#                    sudo update-ca-certificates
#   Fedora, RHEL:    sudo cp {name} /etc/pki/ca-trust/source/anchors/ && sudo update-ca-trust
#   macOS:           sudo security add-trusted-cert -d -r trustRoot \\
#                        -k /Library/Keychains/System.keychain {name}
#   Windows:         certutil -addstore -f ROOT {name}   (in an administrator's prompt)
#   Firefox:         about:config, security.enterprise_roots.enabled = true: the system's
#                    store (Windows, macOS); or Settings > Privacy & Security > Certificates >
#                    View Certificates > Authorities > Import; or NSS's certutil (libnss3-tools):
#                    certutil -A -d sql:FIREFOX_PROFILE_DIR -t C,, -n "oproxy local CA" -i {name}
#   Chromium, Chrome on Linux:
#                    certutil -A -d sql:$HOME/.pki/nssdb -t C,, -n "oproxy local CA" -i {name}
# Or for one program, without touching the system (this CA only, in place of the usual ones):
#   Python (openai, httpx, OpenSSL):  export SSL_CERT_FILE={path}
#   Python requests:                  export REQUESTS_CA_BUNDLE={path}
#   Node.js (added to its own CAs):   export NODE_EXTRA_CA_CERTS={path}
#   curl:                             curl --cacert {path} https://...
"""


def _ca_path(ca: LocalCA, out: TextIO, err: TextIO) -> int:
    if not ca.exists():
        print(
            f"oproxy: there is no local CA in {ca.directory} yet: "
            "'oproxy certs local NAME...' (or certificates.local.names) makes it",
            file=err,
        )
        return 1
    print(ca.certificate_path, file=out)
    print(trust_instructions(ca.certificate_path), file=err, end="")
    return 0


def _status(
    report: CertificateReport, directory: str, now: float, as_json: bool, out: TextIO
) -> int:
    document = report.health(now)
    if as_json:
        print(json.dumps({"directory": directory, **document}, indent=2), file=out)
        return 0
    held = document["served"]
    if not held:
        print(f"No certificates in {directory}", file=out)
    else:
        rows = [("FILE", "NAMES", "ISSUER", "EXPIRES", "DAYS LEFT")]
        rows += [
            (
                each["file"],
                ", ".join(each["names"]),
                each["issuer"],
                each["not_after"],
                f"{each['days_left']:.1f}",
            )
            for each in held
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[4]]), file=out)
    for kind in ("acme", "local"):
        state = document.get(kind)
        if state:
            line = f"{kind}: {state.get('state')}"
            if state.get("error"):
                line += f" ({state['error']})"
            if state.get("next_attempt"):
                line += f", next attempt {state['next_attempt']}"
            print(line, file=out)
    for problem in document.get("unreadable", []):
        print(f"unreadable: {problem}", file=out)
    return 0
