"""
The ``certificates:`` section: where certificates live, and who makes them.

``acme`` obtains and renews certificates from an ACME server (Let's Encrypt
by default) for public names, answering its HTTP-01 challenges itself;
``local`` makes them from a certificate authority of the daemon's own, for
names and addresses on a LAN.  Both write into ``directory``, which a
``tls:`` listener serves by SNI (:mod:`oproxy.certs`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

import attrs

from oproxy.config.values import ConfigError, invalid, items, string

#: Let's Encrypt's production and staging directories.
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
#: Names ``certificates.acme.directory`` may use instead of a URL.
ACME_DIRECTORIES = {"production": LETS_ENCRYPT, "staging": LETS_ENCRYPT_STAGING}

#: ``hsts: true``: a year, what the HSTS preload list asks for.
HSTS_DEFAULT_MAX_AGE = 365 * 24 * 3600

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^({_LABEL}\.)*{_LABEL}$")


def dns_name(value: Any) -> str:
    """A host name, lower-case, without a trailing dot; no wildcard, no address."""
    text = string(value).strip().lower().rstrip(".")
    if text.startswith("*."):
        raise invalid(
            f"{value!r} is a wildcard: HTTP-01, the challenge oproxy answers, cannot prove one"
        )
    if len(text) > 253 or not _DNS_NAME.match(text) or _is_address(text):
        raise invalid(f"must be a host name such as gw.example.com, not {value!r}")
    return text


def name_or_address(value: Any) -> str:
    """
    A host name (``oproxy.lan``, ``*.oproxy.lan``) or an IP address, in its
    canonical form, as a certificate's subject alternative names hold them.
    """
    text = string(value).strip().lower().rstrip(".")
    if _is_address(text):
        return str(ipaddress.ip_address(text.strip("[]")))
    bare = text[2:] if text.startswith("*.") else text
    if len(bare) > 253 or not _DNS_NAME.match(bare):
        raise invalid(f"must be a host name or an IP address, not {value!r}")
    return text


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def acme_directory(value: Any) -> str:
    """An ACME directory URL, or ``production``/``staging`` for Let's Encrypt's."""
    text = string(value).strip()
    if text in ACME_DIRECTORIES:
        return ACME_DIRECTORIES[text]
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise invalid(f"must be an https:// directory URL, staging or production, not {text!r}")
    return text


def domains(value: Any) -> tuple[str, ...]:
    names = items(value, dns_name)
    if not names:
        raise invalid("must name at least one domain")
    return tuple(dict.fromkeys(names))


def names(value: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items(value, name_or_address)))


def hsts(value: Any) -> int | None:
    """``true`` (a year), ``false``, or a ``max-age`` in seconds."""
    if value is True:
        return HSTS_DEFAULT_MAX_AGE
    if value is False:
        return None
    if isinstance(value, int) and value > 0:
        return value
    raise invalid(f"must be true, false or a max-age in seconds, not {value!r}")


def endpoint(value: Any) -> str:
    """One plain-HTTP endpoint string (``tcp:80``)."""
    text = string(value).strip()
    if text.split(":", 1)[0].lower() not in ("tcp", "tcp6", "unix", "systemd"):
        raise invalid(f"must be a plain TCP endpoint such as tcp:80, not {text!r}")
    return text


DNSNames = Annotated[tuple[str, ...], domains]
Names = Annotated[tuple[str, ...], names]
ACMEDirectory = Annotated[str, acme_directory]
HSTS = Annotated[int | None, hsts]
PlainEndpoint = Annotated[str, endpoint]


@attrs.frozen
class AcmeConfig:
    """
    Certificates from an ACME server, for ``domains``.

    :ivar email: the account's contact, for the CA's expiry warnings.
    :ivar directory: the server's directory URL.
    :ivar ca_bundle: the CA file that signs a private ACME server's own
        certificate (``None``: the system's trust store).
    :ivar http01: where HTTP-01 challenges are answered; every other
        request there is redirected to HTTPS.
    """

    domains: DNSNames
    email: str | None = None
    directory: ACMEDirectory = LETS_ENCRYPT
    ca_bundle: str | None = None
    http01: PlainEndpoint = "tcp:80"


@attrs.frozen
class LocalConfig:
    """A certificate from the daemon's own CA, for names and IP addresses."""

    names: Names = ()


@attrs.frozen
class CertificatesConfig:
    """
    :ivar directory: where certificates are written and read from; the
        loader fills in ``<state dir>/certs``.
    :ivar hsts: ``Strict-Transport-Security``'s ``max-age`` on answers over
        TLS (``None``: the header is not sent).
    :ivar redirect_http: a plain-HTTP endpoint where every request is
        redirected to HTTPS (``acme.http01`` is one already).
    """

    directory: str = ""
    acme: AcmeConfig | None = None
    local: LocalConfig | None = None
    hsts: HSTS = None
    redirect_http: PlainEndpoint | None = None

    @property
    def plain_http(self) -> tuple[str, ...]:
        """The endpoints that redirect (and answer challenges) rather than serve."""
        found = [self.acme.http01] if self.acme is not None else []
        if self.redirect_http is not None:
            found.append(self.redirect_http)
        return tuple(dict.fromkeys(found))

    @property
    def makes_certificates(self) -> bool:
        return self.acme is not None or (self.local is not None and bool(self.local.names))


def state_directory(state_path: str) -> str:
    """
    The daemon's state directory: the one that holds the SQLite store
    (``$STATE_DIRECTORY`` under systemd), whichever store is used.
    """
    return os.path.dirname(os.path.abspath(state_path))


def with_directory(certificates: CertificatesConfig, state_path: str) -> CertificatesConfig:
    """The section with ``directory`` filled in (``<state dir>/certs``) and absolute."""
    directory = certificates.directory or os.path.join(state_directory(state_path), "certs")
    return attrs.evolve(certificates, directory=os.path.abspath(os.path.expanduser(directory)))


def check_certificates(certificates: CertificatesConfig, listen: tuple[str, ...]) -> None:
    """
    A name gets its certificate from ACME or from the local CA, not both;
    something must still serve the API once the redirecting endpoints are
    taken out of ``listen``.
    """
    acme, local = certificates.acme, certificates.local
    if acme is not None and local is not None:
        both = [name for name in local.names if name in acme.domains]
        if both:
            raise ConfigError(
                "certificates.local.names",
                f"{both[0]} is also in certificates.acme.domains: a name gets its "
                "certificate from one of them",
            )
    if listen and all(each in certificates.plain_http for each in listen):
        raise ConfigError(
            "listen",
            "every endpoint is one where plain HTTP is redirected to HTTPS; "
            "add a tls: listener (tls:CERTDIR:port=443)",
        )
