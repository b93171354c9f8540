"""
Wire-level fidelity helpers for the fake Ollama server: Go's quoting, JSON
encoding, timestamps, durations and base64 errors, reproduced closely
enough that a client cannot tell the fake from the real Go server by its
bytes.  (Go's JSON *decoding* lives in :mod:`oproxy.testing.ollama.gojson`.)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import orjson

# --------------------------------------------------------------------------
# Quoting and encoding


_GO_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def go_quote(text: str) -> str:
    """
    Go's ``strconv.Quote`` (also what ``%q`` prints), for the error messages
    that embed a model name or a value as the user sent it.
    """
    out = ['"']
    for char in text:
        if char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)


_HTML_ESCAPES: Final = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def go_json(value: Any) -> bytes:
    """
    Encode like Go's ``json.Marshal``: compact, insertion order kept, and
    ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, because Go's encoder
    escapes HTML by default and clients that compare bytes notice.

    Those characters can only occur inside JSON strings, so replacing them
    in the encoded bytes is safe.
    """
    data = orjson.dumps(value)
    for raw, escaped in _HTML_ESCAPES:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


# --------------------------------------------------------------------------
# Timestamps

_NS_PER_SECOND: Final = 1_000_000_000
_RFC3339: Final = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def seconds_to_ns(seconds: float) -> int:
    """
    A clock reading (float seconds) as integer nanoseconds.
    """
    return round(seconds * _NS_PER_SECOND)


def rfc3339_nano(ns: int, offset_minutes: int = 0) -> str:
    """
    Format like Go's ``time.RFC3339Nano`` (what ``time.Time`` marshals to):
    trailing zeros of the fraction are trimmed, and a whole second has no
    fraction at all; UTC is written ``Z``.
    """
    seconds, frac = divmod(ns, _NS_PER_SECOND)
    tz = UTC if offset_minutes == 0 else timezone(timedelta(minutes=offset_minutes))
    stamp = datetime.fromtimestamp(seconds, tz)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    if offset_minutes == 0:
        return text + "Z"
    sign = "+" if offset_minutes > 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def parse_rfc3339_ns(text: str) -> int:
    """
    Nanoseconds since the epoch for an RFC 3339 timestamp with up to nine
    fractional digits (Python's :mod:`datetime` stops at microseconds, which
    is not enough to sort Go timestamps faithfully).
    """
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    whole, frac, zone = match.groups()
    suffix = "+00:00" if zone == "Z" else zone
    stamp = datetime.fromisoformat(whole + suffix)
    fraction_ns = int((frac or "0").ljust(9, "0"))
    return int(stamp.timestamp()) * _NS_PER_SECOND + fraction_ns


# --------------------------------------------------------------------------
# Go's time.ParseDuration (keep_alive strings)

_UNITS: Final = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": _NS_PER_SECOND,
    "m": 60 * _NS_PER_SECOND,
    "h": 3600 * _NS_PER_SECOND,
}
_DURATION_PART: Final = re.compile(r"(\d*)(?:\.(\d*))?")
_MAX_DURATION: Final = (1 << 63) - 1


class GoDurationError(ValueError):
    """
    ``time.ParseDuration`` refused the text; the message is Go's.
    """


def parse_go_duration(text: str) -> int:
    """
    Go's ``time.ParseDuration``, returning nanoseconds and raising
    :class:`GoDurationError` with Go's exact message (``time: invalid
    duration "abc"``, ``time: missing unit in duration "5"``).
    """
    invalid = GoDurationError(f"time: invalid duration {go_quote(text)}")
    rest, negative = text, False
    if rest[:1] in ("-", "+"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise invalid
    total = 0
    while rest:
        match = _DURATION_PART.match(rest)
        assert match is not None  # the pattern can match the empty string
        whole, frac = match.group(1), match.group(2)
        if not whole and not frac:
            raise invalid
        rest = rest[match.end() :]
        unit_len = next((i for i, c in enumerate(rest) if c == "." or c.isdigit()), len(rest))
        if unit_len == 0:
            raise GoDurationError(f"time: missing unit in duration {go_quote(text)}")
        unit_text, rest = rest[:unit_len], rest[unit_len:]
        unit = _UNITS.get(unit_text)
        if unit is None:
            raise GoDurationError(
                f"time: unknown unit {go_quote(unit_text)} in duration {go_quote(text)}"
            )
        total += int(whole or "0") * unit
        if frac:
            total += int(int(frac) * (unit / 10 ** len(frac)))
        if total > 1 << 63:
            raise invalid
    if not negative and total > _MAX_DURATION:
        raise invalid
    return -total if negative else total


# --------------------------------------------------------------------------
# Go's base64.StdEncoding.Decode error offsets

_B64_ALPHABET: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
)
_NEWLINES: Final = frozenset(b"\r\n")
_PAD: Final = ord("=")


def go_base64_error_offset(src: bytes) -> int | None:
    """
    Where Go's ``base64.StdEncoding`` would report ``illegal base64 data at
    input byte N``, or ``None`` when Go accepts the data.

    A port of ``decodeQuantum``: it matters because clients that send a
    ``data:`` URL instead of bare base64 get ``... at input byte 4`` from the
    real server, and tests assert that exact message.
    """
    si, size = 0, len(src)
    while si < size:
        j = 0
        while j < 4:
            if si == size:
                return si - j if j else None
            char = src[si]
            si += 1
            if char in _B64_ALPHABET:
                j += 1
            elif char in _NEWLINES:
                continue
            elif char != _PAD or j < 2:
                return si - 1
            else:
                return _b64_padding_error(src, si, j)
    return None


def _b64_padding_error(src: bytes, si: int, j: int) -> int | None:
    size = len(src)
    if j == 2:
        while si < size and src[si] in _NEWLINES:
            si += 1
        if si == size:
            return size
        if src[si] != _PAD:
            return si - 1
        si += 1
    while si < size and src[si] in _NEWLINES:
        si += 1
    return si if si < size else None
