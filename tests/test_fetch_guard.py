"""
The fetch guard's pure parts: every spelling of a host is either refused as
malformed or reduced to the one address it means, and every address that is
not on the public internet is refused, in any family or embedding.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from oproxy.fetch_guard import (
    FetchPolicy,
    MalformedURL,
    RefusedAddress,
    is_public,
    parse_host,
    parse_url,
    redirect_target,
)

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def refused(url: str, policy: FetchPolicy | None = None) -> bool:
    """Whether ``url`` is malformed or leads only to refused addresses."""
    policy = policy or FetchPolicy()
    try:
        target = parse_url(url)
    except MalformedURL:
        return True
    if isinstance(target.host, str):
        return False  # a name: the resolver decides, tested elsewhere
    try:
        policy.check(target, [target.host])
    except RefusedAddress:
        return True
    return False


# -- spellings ------------------------------------------------------------------------


def _number(value: int, style: str, zeros: int, upper: bool) -> str:
    if style == "hex":
        digits = f"{value:x}"
        return ("0X" if upper else "0x") + "0" * zeros + (digits.upper() if upper else digits)
    if style == "octal":
        return "0" + "0" * zeros + f"{value:o}"
    return str(value)


@st.composite
def spellings(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """
    One of the ways a browser's URL parser reads as ``address``: one to four
    parts (the last filling the remaining bytes), each decimal, octal or
    hex, with leading zeros, an optional trailing dot, and full-width or
    ideographic dots and full-width digits that IDNA maps to ASCII.
    """
    value = int(address)
    count = draw(st.integers(1, 4))
    octets = value.to_bytes(4, "big")
    leading = list(octets[: count - 1])
    last = int.from_bytes(octets[count - 1 :], "big")
    parts = []
    for part in [*leading, last]:
        style = draw(st.sampled_from(["decimal", "octal", "hex"]))
        zeros = draw(st.integers(0, 3))
        parts.append(_number(part, style, zeros, draw(st.booleans())))
    dot = draw(st.sampled_from([".", ".", "\u3002", "\uff0e", "\uff61"]))
    text = dot.join(parts) + draw(st.sampled_from(["", "."]))
    if draw(st.booleans()):
        text = text.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})
    return text


@given(st.data())
def test_every_spelling_of_loopback_is_loopback_and_refused(data: st.DataObject) -> None:
    spelling = data.draw(spellings(LOOPBACK))
    assert parse_host(spelling) == LOOPBACK
    assert refused(f"http://{spelling}:8080/x.png")


private_v4 = st.one_of(
    st.ip_addresses(network="10.0.0.0/8"),
    st.ip_addresses(network="127.0.0.0/8"),
    st.ip_addresses(network="169.254.0.0/16"),
    st.ip_addresses(network="172.16.0.0/12"),
    st.ip_addresses(network="192.168.0.0/16"),
    st.ip_addresses(network="100.64.0.0/10"),
    st.ip_addresses(network="0.0.0.0/8"),
    st.ip_addresses(network="224.0.0.0/4"),
    st.ip_addresses(network="240.0.0.0/4"),
)


@given(private_v4, st.data())
def test_every_spelling_of_a_private_address_is_refused(
    address: ipaddress.IPv4Address, data: st.DataObject
) -> None:
    spelling = data.draw(spellings(address))
    assert parse_host(spelling) == address
    assert refused(f"http://{spelling}/x.png")


@given(st.ip_addresses(v=4), st.data())
def test_every_spelling_of_an_address_canonicalises_to_it(
    address: ipaddress.IPv4Address, data: st.DataObject
) -> None:
    spelling = data.draw(spellings(address))
    target = parse_url(f"https://{spelling}/cat.png?size=2")
    assert target.host == address
    assert target.url == f"https://{address}/cat.png?size=2"
    assert refused(target.url) == (not is_public(address))


@given(st.ip_addresses(v=4))
def test_public_addresses_in_any_spelling_are_allowed(address: ipaddress.IPv4Address) -> None:
    assume(is_public(address))
    assert not refused(f"http://{int(address)}/x.png")
    assert not refused(f"http://0x{int(address):x}/x.png")


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_and_nat64_forms_judge_the_ipv4_address(
    address: ipaddress.IPv4Address,
) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) + int(address))
    assert is_public(mapped) == is_public(address) == is_public(nat64)


@pytest.mark.parametrize(
    "host",
    [
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "0177.1",
        "0x7f.1",
        "0",
        "127.000.000.001",
        "127。0。0。1",
        "①②⑦.0.0.1",
        "%31%32%37.0.0.1",
        "[::127.0.0.1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::1]",
        "[::]",
        "[64:ff9b::7f00:1]",
        "[64:ff9b::a00:1]",
        "[fd00::1]",
        "[fe80::1]",
        "[2002:7f00:1::]",
        "169.254.169.254",
        "100.100.100.200",
        "192.0.0.192",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.251",
    ],
)
def test_the_reported_forms_are_refused(host: str) -> None:
    assert refused(f"http://{host}:9/x.png")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1%2509:80/",
        "http://[fe80::1%25eth0]/x",
        "http://1.2.3.4.5/x",
        "http://256.0.0.1/x",
        "http://1.2.3.0x100/x",
        "http://0x100000000/x",
        "http://exa mple.com/x",
        "http://a..b/x",
        "http:///x",
        "http://example.com:99999/x",
        "http://example.com:8o/x",
        "http://[::1/x",
        "http://[::1]x/x",
        "http://evil.example\\@127.0.0.1/x",
        "http://%ff%fe/x",
        "http://xn--a/x",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_",
    ],
)
def test_malformed_urls_are_refused_before_any_lookup(url: str) -> None:
    with pytest.raises(MalformedURL):
        parse_url(url)


def test_credentials_do_not_hide_the_host() -> None:
    target = parse_url("http://images.example.com:80@127.0.0.1:8080/x.png")
    assert target.host == LOOPBACK
    assert target.port == 8080
    assert "@" not in target.url


def test_names_are_mapped_as_a_browser_maps_them() -> None:
    assert parse_host("\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25\u3002com.") == "example.com"
    assert parse_host("bücher.example") == "xn--bcher-kva.example"
    assert parse_host("Images.Example.COM") == "images.example.com"
    # Ends in a number: an address, and a malformed one.
    with pytest.raises(MalformedURL):
        parse_host("example.0x")  # "0x" is a number (zero), "example" is not
    assert parse_host("1.example") == "1.example"


def test_paths_are_percent_encoded_and_fragments_dropped() -> None:
    target = parse_url("http://example.com/a b/ü.png?q=1 2#frag")
    assert target.url == "http://example.com/a%20b/%C3%BC.png?q=1%202"
    assert target.for_logs == "http://example.com/a%20b/%C3%BC.png"
    assert parse_url("https://example.com").url == "https://example.com/"


def test_redirects_resolve_against_the_current_url() -> None:
    here = parse_url("https://images.example.com/a/b.png")
    assert redirect_target(here, "c.png").url == "https://images.example.com/a/c.png"
    assert redirect_target(here, "//other.example/x").url == "https://other.example/x"
    assert redirect_target(here, "http://[::1]:81/").host == ipaddress.IPv6Address("::1")
    with pytest.raises(MalformedURL):
        redirect_target(here, "file:///etc/passwd")


# -- addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "127.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "64:ff9b::7f00:1",
        "64:ff9b:1::1",
        "169.254.169.254",
        "fd00::1",
        "fd00:ec2::254",
        "fc00::1",
        "fe80::1",
        "fec0::1",
        "::1",
        "::",
        "::7f00:1",
        "ff02::1",
        "100.64.0.1",
        "100.100.100.200",
        "192.0.0.192",
        "192.0.2.1",
        "198.18.0.1",
        "224.0.0.1",
        "0.0.0.0",
        "2001:db8::1",
        "2001::1",
        "2002:a00:1::1",
    ],
)
def test_addresses_off_the_internet_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"]
)
def test_internet_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


def test_one_private_address_among_public_ones_refuses_the_name() -> None:
    target = parse_url("http://images.example.com/x.png")
    addresses = [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1")]
    with pytest.raises(RefusedAddress):
        FetchPolicy().check(target, addresses)
    with pytest.raises(RefusedAddress):
        FetchPolicy().check(target, [])


def test_the_allow_list_names_hosts_and_networks() -> None:
    policy = FetchPolicy.from_entries(["lan-cam.home", "*.images.lan", "192.168.1.0/24"])
    lan = ipaddress.ip_address("192.168.7.7")
    assert policy.permits("lan-cam.home", lan)
    assert policy.permits("a.b.images.lan", lan)
    assert not policy.permits("images.lan", lan)  # subdomains only
    assert not policy.permits("other.home", lan)
    assert policy.permits(None, ipaddress.ip_address("192.168.1.20"))
    assert policy.permits(None, ipaddress.ip_address("::ffff:192.168.1.20"))
    assert not policy.permits(None, ipaddress.ip_address("192.168.2.20"))
    # An allowed name still never leads to "this host" or the metadata service.
    for address in ["169.254.169.254", "0.0.0.0", "fd00:ec2::254", "::"]:
        assert not policy.permits("lan-cam.home", ipaddress.ip_address(address))
    assert FetchPolicy(open=True).permits(None, LOOPBACK)


def test_the_vetted_address_is_the_plain_one() -> None:
    target = parse_url("http://images.example.com/x.png")
    mapped = ipaddress.ip_address("::ffff:8.8.8.8")
    assert FetchPolicy().check(target, [mapped]) == ipaddress.ip_address("8.8.8.8")
