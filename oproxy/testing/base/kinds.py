"""
The kind of a decoded JSON value, which each fake words its own way in its
error messages (Go's ``cannot unmarshal number``, OpenAI's ``got an
integer``).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["null", "boolean", "integer", "number", "string", "array", "object"]


def kind_of(value: object) -> Kind:
    """
    What JSON ``value`` was: booleans are not integers, and an integer is
    told apart from a number with a fraction or an exponent.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
