"""
Which URLs the proxy may fetch on a client's behalf, and where it connects.

A guard that looks at how a host is *spelt* is no guard: ``127.1``,
``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``①②⑦。0。0。1`` and any
name in ``/etc/hosts`` all reach loopback.  So the host is parsed the way a
browser's URL parser does (WHATWG: percent-decoding, IDNA mapping with
full-width dots and digits, IPv4 numbers with fewer parts and octal or hex
parts), every spelling is either refused as malformed or reduced to one
address or one ASCII name, names are resolved once, and every resulting
address is checked.  The connection then goes to the address that was
checked (a second lookup could answer differently: DNS rebinding), and each
redirect hop goes through the same steps.

Nothing here does I/O except :func:`resolve`, which asks the resolver it is
given; the rest is pure and tested with property tests over spellings.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import idna
from twisted.internet import defer
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from zope.interface import implementer

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class MalformedURL(ValueError):
    """The URL cannot be parsed into something to fetch (the client's spelling)."""


class RefusedAddress(Exception):
    """The URL leads somewhere the proxy does not fetch from."""


# -- hosts, spelt every way -----------------------------------------------------------

_HEX = frozenset(string.hexdigits)
_DOMAIN = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")


def _ipv4_number(part: str) -> int | None:
    """One part of a WHATWG IPv4 address: decimal, ``0x`` hex or ``0`` octal."""
    radix = 10
    if len(part) >= 2 and part[:2] in ("0x", "0X"):
        radix, part = 16, part[2:]
    elif len(part) >= 2 and part[0] == "0":
        radix, part = 8, part[1:]
    if not part:
        return 0
    digits = string.hexdigits if radix == 16 else string.digits[:radix]
    if any(c not in digits for c in part):
        return None
    return int(part, radix)


def _ends_in_a_number(host: str) -> bool:
    """WHATWG's test for whether ``host`` must be read as an IPv4 address."""
    parts = host.split(".")
    if parts[-1] == "":
        if len(parts) == 1:
            return False
        parts.pop()
    last = parts[-1]
    if last and all(c in string.digits for c in last):
        return True
    return last[:2] in ("0x", "0X") and all(c in _HEX for c in last[2:])


def _ipv4(host: str) -> ipaddress.IPv4Address:
    """WHATWG's IPv4 parser: 1 to 4 parts, the last one filling what is left."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4 or any(not part for part in parts):
        raise MalformedURL("not an IPv4 address")
    numbers = [_ipv4_number(part) for part in parts]
    if any(n is None for n in numbers):
        raise MalformedURL("not an IPv4 address")
    checked = [n for n in numbers if n is not None]
    *leading, last = checked
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(checked)):
        raise MalformedURL("an IPv4 part is out of range")
    value = last
    for index, n in enumerate(leading):
        value += n * 256 ** (3 - index)
    return ipaddress.IPv4Address(value)


def _ipv6(text: str) -> ipaddress.IPv6Address:
    if not _IPV6_TEXT.fullmatch(text):  # no zone ids (%eth0), nothing else
        raise MalformedURL("not an IPv6 address")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise MalformedURL("not an IPv6 address") from None


def _ascii_label(label: str) -> str:
    if label.isascii():
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise MalformedURL("a host label is not valid punycode") from None
        return label
    try:
        return idna.encode(label, uts46=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise MalformedURL("a host label is not a valid international name") from None


def parse_host(text: str) -> str | Address:
    """
    A URL's host as a browser reads it: an address, or a lower-case ASCII
    domain name without a trailing dot.

    :raises MalformedURL: for any host a browser would refuse, and for a few
        it would take that no image server uses (characters outside
        letters, digits, ``-``, ``_`` and ``.`` once mapped to ASCII).
    """
    if text.startswith("["):
        if not text.endswith("]"):
            raise MalformedURL("an IPv6 host must end with ']'")
        return _ipv6(text[1:-1])
    try:
        decoded = unquote_to_bytes(text).decode("utf-8")
        mapped = idna.uts46_remap(decoded, std3_rules=False, transitional=False)
    except (UnicodeError, idna.IDNAError):
        raise MalformedURL("the host is not a valid name") from None
    labels = mapped.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels.pop()
    host = ".".join(_ascii_label(label) for label in labels).lower()
    if not host:
        raise MalformedURL("the URL has no host")
    if _ends_in_a_number(host):
        return _ipv4(host)
    if not _DOMAIN.fullmatch(host) or len(host) > 253:
        raise MalformedURL("the host is not a valid name")
    if any(len(label) > 63 for label in host.split(".")):
        raise MalformedURL("a host label is longer than 63 characters")
    return host


# -- URLs ---------------------------------------------------------------------------

_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """
    One URL, parsed once: what to ask for, and of whom.

    :ivar host: the canonical host: an address or an ASCII name.  The
        ``Host`` header, TLS's SNI and the certificate check use it.
    """

    scheme: str
    host: str | Address
    port: int
    path: str
    query: str

    @property
    def name(self) -> str | None:
        """The host name, when the host is not an address."""
        return self.host if isinstance(self.host, str) else None

    @property
    def host_text(self) -> str:
        """The host as it goes in a URL (IPv6 in brackets)."""
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]"
        return str(self.host)

    @property
    def origin(self) -> str:
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{self.host_text}{port}"

    @property
    def url(self) -> str:
        """The URL to send: canonical host, percent-encoded path, no fragment."""
        query = f"?{self.query}" if self.query else ""
        return f"{self.origin}{self.path}{query}"

    @property
    def for_logs(self) -> str:
        """The URL without its query, which may carry tokens."""
        return f"{self.origin}{self.path}"


def parse_url(url: str) -> Target:
    """
    An ``http(s)`` URL as the :class:`Target` to fetch.

    :raises MalformedURL: for other schemes, a missing or malformed host, a
        bad port, or anything :func:`urlsplit` refuses.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        raise MalformedURL("the URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise MalformedURL("only http and https URLs are fetched")
    if "\\" in netloc:
        raise MalformedURL("the URL's authority holds a backslash")
    # Credentials are never sent on the client's behalf.
    host_port = netloc.rpartition("@")[2]
    if host_port.startswith("["):
        host, bracket, rest = host_port.partition("]")
        host += bracket
        if rest and not rest.startswith(":"):
            raise MalformedURL("unexpected text after an IPv6 host")
        port_text = rest[1:]
    else:
        host, _, port_text = host_port.partition(":")
    if not port_text:
        port = _DEFAULT_PORTS[scheme]
    elif port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise MalformedURL("the port is not a number from 0 to 65535")
    return Target(
        scheme=scheme,
        host=parse_host(host),
        port=port,
        path=quote(parts.path or "/", safe=_PATH_SAFE),
        query=quote(parts.query, safe=_QUERY_SAFE),
    )


def redirect_target(current: Target, location: str) -> Target:
    """Where a redirect's ``Location`` points, relative to the current URL."""
    return parse_url(urljoin(current.url, location.strip()))


# -- addresses ----------------------------------------------------------------------


def _networks(*texts: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


#: IPv4 ranges that are not the public internet (IANA's special-purpose
#: registry): this host, private, CGNAT, loopback, link-local (the cloud
#: metadata services), protocol assignments, documentation, benchmarking,
#: 6to4 relays, multicast, reserved and broadcast.
_SPECIAL_V4 = _networks(
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
#: The only IPv6 unicast the internet routes; everything outside it is
#: loopback, unspecified, IPv4-compatible, link- or site-local, unique local
#: (``fc00::/7``, which holds ``fd00::/8``), multicast or reserved.
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
#: Inside it: protocol assignments (Teredo among them), documentation, 6to4
#: (which embeds an IPv4 address of its choosing).
_SPECIAL_V6 = _networks("2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20")
#: NAT64's well-known prefix: the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: What an allowed *name* may still not resolve to: "this host" (which
#: reaches loopback), link-local (where the cloud metadata services live)
#: and the metadata addresses outside it.  A network entry may allow them.
_NEVER_BY_NAME = _networks(
    "0.0.0.0/8",
    "169.254.0.0/16",
    "100.100.100.200/32",
    "192.0.0.192/32",
    "::/128",
    "fe80::/10",
    "fd00:ec2::254/128",
)


def plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: Address) -> bool:
    """
    Whether ``address`` is on the public internet, whatever family or
    embedding (IPv4-mapped, NAT64) it comes in.
    """
    address = plain(address)
    if isinstance(address, ipaddress.IPv4Address):
        return address.is_global and not any(address in net for net in _SPECIAL_V4)
    if address in _NAT64:
        return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return (
        address in _GLOBAL_UNICAST_V6
        and not any(address in net for net in _SPECIAL_V6)
        and address.is_global
    )


def _within(address: Address, networks: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


@dataclass(frozen=True)
class FetchPolicy:
    """
    Where fetches may go: public addresses, plus what the operator allowed.

    :ivar names: exact host names, or ``*.example.lan`` for its subdomains.
    :ivar networks: addresses allowed whatever name led to them.
    :ivar open: the guard is off (``allow_private_networks``).
    """

    names: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    open: bool = False

    @classmethod
    def from_entries(cls, entries: Sequence[str], *, open: bool = False) -> FetchPolicy:
        """From ``images.allow_hosts``: names and CIDR networks."""
        names: list[str] = []
        networks: list[Network] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.append(entry.lower().rstrip("."))
        return cls(tuple(names), tuple(networks), open)

    def names_host(self, name: str | None) -> bool:
        if name is None:
            return False
        for pattern in self.names:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]):
                    return True
            elif name == pattern:
                return True
        return False

    def permits(self, name: str | None, address: Address) -> bool:
        """Whether ``address``, reached through host ``name``, may be fetched from."""
        if self.open:
            return True
        address = plain(address)
        if _within(address, self.networks):
            return True
        if self.names_host(name):
            return not _within(address, _NEVER_BY_NAME)
        return is_public(address)

    def check(self, target: Target, addresses: Sequence[Address]) -> Address:
        """
        The address to connect to, once every address the host has is
        allowed (a name with one private address among public ones is
        refused: which one a client would get is the resolver's choice).

        :raises RefusedAddress: naming the reason, for the logs only.
        """
        if not addresses:
            raise RefusedAddress(f"{target.host_text} has no address")
        for address in addresses:
            if not self.permits(target.name, address):
                raise RefusedAddress(f"{target.host_text} resolves to {address}, not allowed")
        return plain(addresses[0])


# -- resolving, once ----------------------------------------------------------------


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[Address] = []
        self.done: defer.Deferred[list[Address]] = defer.Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            with contextlib.suppress(ValueError):
                self.addresses.append(ipaddress.ip_address(host))

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


async def resolve(resolver: IHostnameResolver, target: Target) -> list[Address]:
    """
    The addresses of ``target``'s host: itself for an address, else what
    the resolver answers (``/etc/hosts`` included, as the system's
    ``getaddrinfo`` reads it).
    """
    if not isinstance(target.host, str):
        return [target.host]
    collector = _Collector()
    resolver.resolveHostName(collector, target.host, target.port)
    return await collector.done
