"""
Go's ``encoding/json`` decoding, as far as the fake Ollama needs it: syntax
errors and type mismatches with the real server's exact messages.

The real server decodes requests into typed structs, so its errors name Go
types and struct fields (``json: cannot unmarshal string into Go struct
field Message.messages.content of type string``).  A proxy that forwards or
translates those errors is only tested properly if the fake says the same
thing, which is why this re-implements the relevant parts of Go's decoder
instead of relying on Python's :mod:`json` messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from oproxy.testing.base.kinds import Kind, kind_of
from oproxy.testing.ollama.wire import go_quote

# --------------------------------------------------------------------------
# Syntax errors with Go's messages


class GoJSONError(ValueError):
    """
    The request body is not what Go's decoder accepts; ``str(exc)`` is the
    message the real server puts in ``{"error": ...}`` (status 400).
    """


class MissingBodyError(GoJSONError):
    """
    The body is empty or only whitespace: Go's decoder returns ``io.EOF`` and
    Ollama answers ``missing request body``.
    """

    def __init__(self) -> None:
        super().__init__("missing request body")


class GoAbortError(GoJSONError):
    """
    An ``UnmarshalJSON`` method failed: Go stops decoding at once and this
    error wins over any type mismatch saved earlier.
    """


def _quote_char(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    byte = char.encode("utf-8")[0]
    return "'" + go_quote(chr(byte))[1:-1] + "'"


class _Scanner:
    """
    Validates the first JSON value of a body with Go's ``encoding/json``
    scanner semantics, raising :class:`GoJSONError` with Go's wording.

    Only the first value matters because Ollama (through gin) uses a
    ``json.Decoder``, which ignores anything after it.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.size = len(text)

    def first_value(self) -> tuple[int, int]:
        """
        The ``(start, end)`` span of the first value.
        """
        start = self._skip_ws(0)
        if start == self.size:
            raise MissingBodyError()
        return start, self._value(start)

    def _skip_ws(self, index: int) -> int:
        while index < self.size and self.text[index] in " \t\r\n":
            index += 1
        return index

    def _char(self, index: int) -> str:
        if index >= self.size:
            raise GoJSONError("unexpected EOF")
        return self.text[index]

    @staticmethod
    def _invalid(char: str, context: str) -> GoJSONError:
        return GoJSONError(f"invalid character {_quote_char(char)} {context}")

    def _value(self, index: int) -> int:
        char = self._char(index)
        if char == "{":
            return self._object(index + 1)
        if char == "[":
            return self._array(index + 1)
        if char == '"':
            return self._string(index + 1)
        if char == "-" or "0" <= char <= "9":
            return self._number(index)
        for literal in ("true", "false", "null"):
            if char == literal[0]:
                return self._literal(index, literal)
        raise self._invalid(char, "looking for beginning of value")

    def _object(self, index: int) -> int:
        index = self._skip_ws(index)
        if self._char(index) == "}":
            return index + 1
        while True:
            if self._char(index) != '"':
                raise self._invalid(self.text[index], "looking for beginning of object key string")
            index = self._skip_ws(self._string(index + 1))
            if self._char(index) != ":":
                raise self._invalid(self.text[index], "after object key")
            index = self._skip_ws(self._value(self._skip_ws(index + 1)))
            char = self._char(index)
            if char == "}":
                return index + 1
            if char != ",":
                raise self._invalid(char, "after object key:value pair")
            index = self._skip_ws(index + 1)

    def _array(self, index: int) -> int:
        index = self._skip_ws(index)
        if self._char(index) == "]":
            return index + 1
        while True:
            index = self._skip_ws(self._value(index))
            char = self._char(index)
            if char == "]":
                return index + 1
            if char != ",":
                raise self._invalid(char, "after array element")
            index = self._skip_ws(index + 1)

    def _string(self, index: int) -> int:
        while True:
            char = self._char(index)
            if char == '"':
                return index + 1
            if char == "\\":
                index = self._escape(index + 1)
                continue
            if ord(char) < 0x20:
                raise self._invalid(char, "in string literal")
            index += 1

    def _escape(self, index: int) -> int:
        char = self._char(index)
        if char in '"\\/bfnrt':
            return index + 1
        if char != "u":
            raise self._invalid(char, "in string escape code")
        for offset in range(1, 5):
            digit = self._char(index + offset)
            if digit not in "0123456789abcdefABCDEF":
                raise self._invalid(digit, "in \\u hexadecimal character escape")
        return index + 5

    def _digits(self, index: int) -> int:
        while index < self.size and "0" <= self.text[index] <= "9":
            index += 1
        return index

    def _number(self, index: int) -> int:
        if self.text[index] == "-":
            index += 1
            char = self._char(index)
            if not "0" <= char <= "9":
                raise self._invalid(char, "in numeric literal")
        index = index + 1 if self.text[index] == "0" else self._digits(index)
        if index < self.size and self.text[index] == ".":
            char = self._char(index + 1)
            if not "0" <= char <= "9":
                raise self._invalid(char, "after decimal point in numeric literal")
            index = self._digits(index + 1)
        if index < self.size and self.text[index] in "eE":
            index += 1
            if self._char(index) in "+-":
                index += 1
            char = self._char(index)
            if not "0" <= char <= "9":
                raise self._invalid(char, "in exponent of numeric literal")
            index = self._digits(index)
        return index

    def _literal(self, index: int, literal: str) -> int:
        for offset in range(1, len(literal)):
            char = self._char(index + offset)
            if char != literal[offset]:
                raise self._invalid(
                    char, f"in literal {literal} (expecting {_quote_char(literal[offset])})"
                )
        return index + len(literal)


class _GoFloat(float):
    """
    A JSON number with a fraction or exponent, remembering its literal so a
    type error can quote it as Go does (``number 1.5``).
    """

    raw: str


def _parse_float(literal: str) -> float:
    number = _GoFloat(literal)
    number.raw = literal
    return number


_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def plain(value: Any) -> Any:
    """
    A decoded JSON value with the decoder's bookkeeping types replaced by
    plain Python ones (and lone surrogates by U+FFFD, as Go does), safe to
    hand to tests and to ``orjson``.
    """
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, _GoFloat):
        return float(value)
    if isinstance(value, str) and _LONE_SURROGATE.search(value):
        return _LONE_SURROGATE.sub("\ufffd", value)
    return value


def parse_go_json(body: bytes) -> Any:
    """
    The first JSON value of ``body``, or :class:`GoJSONError` with the
    message Go's ``json.Decoder`` would give.  Numbers with a fraction keep
    their literal (see :class:`_GoFloat`); pass results through :func:`plain`
    before exposing them.
    """
    text = body.decode("utf-8", errors="replace")
    start, end = _Scanner(text).first_value()
    try:
        return json.loads(text[start:end], parse_float=_parse_float)
    except RecursionError:
        raise GoJSONError("exceeded max depth") from None


# --------------------------------------------------------------------------
# Go's struct decoding: type mismatches with Go's field paths


_GO_KINDS: Final[dict[Kind, str]] = {
    "boolean": "bool",
    "integer": "number",
    "number": "number",
    "string": "string",
    "array": "array",
}


def json_kind(value: Any) -> str:
    """
    The JSON type name Go uses in ``cannot unmarshal <kind> into ...``.
    """
    return _GO_KINDS.get(kind_of(value), "object")


@dataclass(frozen=True)
class GoType:
    """
    A Go type as the decoder sees it.

    :ivar kind: ``string``, ``bool``, ``int``, ``float``, ``any``, ``map``
        (``map[string]any``), ``slice``, ``struct`` or ``custom``.
    :ivar name: how Go prints the type in errors (``[]api.Message``).
    """

    kind: str
    name: str
    elem: GoType | None = None
    fields: tuple[tuple[str, GoType], ...] = ()
    struct_name: str = ""
    custom: Callable[[Any], Any] | None = field(default=None, compare=False)


STRING: Final = GoType("string", "string")
BOOL: Final = GoType("bool", "bool")
INT: Final = GoType("int", "int")
FLOAT: Final = GoType("float", "float64")
ANY: Final = GoType("any", "interface {}")
OPTIONS: Final = GoType("map", "map[string]interface {}")


def slice_of(elem: GoType, name: str) -> GoType:
    """
    A Go slice type whose elements decode as ``elem``.
    """
    return GoType("slice", name, elem=elem)


def struct(struct_name: str, go_name: str, /, **fields: GoType) -> GoType:
    """
    A Go struct named ``struct_name`` (printed ``go_name``); keyword names
    are the JSON field names, in declaration order.
    """
    return GoType("struct", go_name, fields=tuple(fields.items()), struct_name=struct_name)


def custom(name: str, decode: Callable[[Any], Any]) -> GoType:
    """
    A type with its own ``UnmarshalJSON``: ``decode`` gets the plain value
    and raises :class:`GoAbortError` (stops decoding) or
    :class:`GoSavedError` (remembered, decoding goes on), or returns
    :data:`MISMATCH` for a plain type error.
    """
    return GoType("custom", name, custom=decode)


MISMATCH: Final = object()
"""Returned by a custom decoder for a JSON type it cannot take at all."""


class GoSavedError(GoJSONError):
    """
    An error Go's decoder remembers and reports at the end (the first one
    wins), such as a bad base64 image.
    """


_SKIP: Final = object()
_INT64: Final = range(-(1 << 63), 1 << 63)


class _StructDecoder:
    def __init__(self) -> None:
        self.saved: str | None = None

    def save(self, message: str) -> None:
        if self.saved is None:
            self.saved = message

    def mismatch(self, value: Any, go_type: GoType, where: tuple[str, tuple[str, ...]]) -> Any:
        kind = json_kind(value)
        if go_type.kind == "int" and kind == "number":
            kind = f"number {getattr(value, 'raw', value)}"
        struct_name, path = where
        target = f"Go struct field {struct_name}.{'.'.join(path)}" if struct_name else "Go value"
        self.save(f"json: cannot unmarshal {kind} into {target} of type {go_type.name}")
        return _SKIP

    def decode(self, value: Any, go_type: GoType, where: tuple[str, tuple[str, ...]]) -> Any:
        if value is None:
            return _SKIP
        handler = getattr(self, f"_decode_{go_type.kind}")
        return handler(value, go_type, where)

    def _decode_string(self, value: Any, go_type: GoType, where: Any) -> Any:
        return plain(value) if isinstance(value, str) else self.mismatch(value, go_type, where)

    def _decode_bool(self, value: Any, go_type: GoType, where: Any) -> Any:
        return value if isinstance(value, bool) else self.mismatch(value, go_type, where)

    def _decode_int(self, value: Any, go_type: GoType, where: Any) -> Any:
        ok = isinstance(value, int) and not isinstance(value, bool) and value in _INT64
        return value if ok else self.mismatch(value, go_type, where)

    def _decode_float(self, value: Any, go_type: GoType, where: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return self.mismatch(value, go_type, where)

    def _decode_any(self, value: Any, go_type: GoType, where: Any) -> Any:
        return plain(value)

    def _decode_map(self, value: Any, go_type: GoType, where: Any) -> Any:
        return plain(value) if isinstance(value, dict) else self.mismatch(value, go_type, where)

    def _decode_custom(self, value: Any, go_type: GoType, where: Any) -> Any:
        assert go_type.custom is not None
        try:
            result = go_type.custom(plain(value))
        except GoSavedError as exc:
            self.save(str(exc))
            return _SKIP
        return self.mismatch(value, go_type, where) if result is MISMATCH else result

    def _decode_slice(self, value: Any, go_type: GoType, where: Any) -> Any:
        if not isinstance(value, list):
            return self.mismatch(value, go_type, where)
        assert go_type.elem is not None
        items = (self.decode(item, go_type.elem, where) for item in value)
        return [None if item is _SKIP else item for item in items]

    def _decode_struct(self, value: Any, go_type: GoType, where: Any) -> Any:
        if not isinstance(value, dict):
            return self.mismatch(value, go_type, where)
        by_name = {name: (name, t) for name, t in go_type.fields}
        by_fold = {name.lower(): (name, t) for name, t in go_type.fields}
        out: dict[str, Any] = {}
        for key, item in value.items():
            found = by_name.get(key) or by_fold.get(key.lower())
            if found is None:
                continue  # Go ignores unknown fields
            name, field_type = found
            decoded = self.decode(item, field_type, (go_type.struct_name, (*where[1], name)))
            if decoded is not _SKIP:
                out[name] = decoded
        return out


def decode_go_struct(raw: Any, go_type: GoType) -> dict[str, Any]:
    """
    Decode an already parsed JSON value into a Go struct's shape: canonical
    field names, unknown fields dropped, and Go's first error raised as
    :class:`GoJSONError` (``null`` at the top decodes to an empty struct).
    """
    decoder = _StructDecoder()
    result = decoder.decode(raw, go_type, ("", ()))
    if decoder.saved is not None:
        raise GoJSONError(decoder.saved)
    return {} if result is _SKIP else dict(result)


def first_present(values: Mapping[str, Any], *names: str) -> Any:
    """
    The first of ``names`` present with a non-empty value, like Go's
    ``cmp.Or`` over the deprecated ``name`` and the current ``model``.
    """
    for name in names:
        if values.get(name):
            return values[name]
    return ""
