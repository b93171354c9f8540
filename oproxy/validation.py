"""
The toolkit that validates a parsed YAML tree: sections that know their
path and refuse unknown keys, and converters that name the key at fault.

Every part of the configuration (the core in :mod:`oproxy.config`, keys and
limits in :mod:`oproxy.security.settings`) is read with these, so every
error reads the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

MIB = 1024 * 1024

T = TypeVar("T")


class ConfigError(Exception):
    """
    The configuration is not valid; ``str()`` names the key and the problem.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def join_key(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


class Section:
    """
    A mapping being validated, which remembers its path and which keys were used.
    """

    def __init__(self, node: Any, key: str) -> None:
        if node is None:
            node = {}
        if not isinstance(node, dict):
            raise ConfigError(key, f"must be a mapping, not {kind_of(node)}")
        self.node: dict[Any, Any] = node
        self.key = key
        self.used: set[str] = set()

    def path(self, name: str) -> str:
        return join_key(self.key, name)

    def get(self, name: str, default: T, convert: Callable[[Any, str], T]) -> T:
        self.used.add(name)
        if name not in self.node or self.node[name] is None:
            return default
        return convert(self.node[name], self.path(name))

    def require(self, name: str, convert: Callable[[Any, str], T]) -> T:
        self.used.add(name)
        if name not in self.node or self.node[name] is None:
            raise ConfigError(self.path(name), "is required")
        return convert(self.node[name], self.path(name))

    def section(self, name: str) -> Section:
        self.used.add(name)
        return Section(self.node.get(name), self.path(name))

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.node if str(k) not in self.used)
        if unknown:
            raise ConfigError(self.path(unknown[0]), "is not a known setting")


def kind_of(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def as_string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, not {kind_of(value)}")
    return value


def as_boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {kind_of(value)}")
    return value


def as_seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, f"must be a positive number of seconds, not {value!r}")
    return float(value)


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def as_byte_size(value: Any, key: str) -> int:
    """
    Accept ``1048576``, ``"512KiB"``, ``"32MiB"`` or ``"1GB"`` (binary units).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(key, f"must be a positive size such as 32MiB, not {value!r}")
    unit = (match.group(2) or "B")[0].upper()
    size = int(match.group(1)) * {"B": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[unit]
    if size <= 0:
        raise ConfigError(key, "must be larger than zero")
    return size


def as_list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, not {kind_of(value)}")
    return value


def as_count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a positive whole number, not {value!r}")
    return value
