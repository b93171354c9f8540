"""
The words and vectors both fakes answer with, so that a test can expect the
same text from either: word tokens with their leading space, prompt tokens
counted in words, the excerpt an answer quotes, an instance of a JSON
schema for structured output and tool arguments, and deterministic unit
embeddings in float32.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

EXCERPT_WORDS: Final = 8
_TOKEN: Final = re.compile(r"\s*\S+|\s+$")


# --------------------------------------------------------------------------
# Text


def tokenize(text: str) -> list[str]:
    """
    Split ``text`` into word tokens that keep their leading whitespace, so
    the tokens concatenate back to ``text`` exactly.
    """
    return _TOKEN.findall(text)


def count_words(*texts: str) -> int:
    """
    The fake's prompt token count: whitespace-separated words, at least 1.
    """
    return max(1, sum(len(text.split()) for text in texts))


def excerpt(text: str) -> str:
    """
    The first :data:`EXCERPT_WORDS` words of ``text``, without trailing
    sentence punctuation (so the answer does not read ``hi?.``).
    """
    return " ".join(text.split()[:EXCERPT_WORDS]).rstrip(".!?,;:")


# --------------------------------------------------------------------------
# Structured output


def _string_for(key: str) -> str:
    return "Tokyo" if key.lower() in ("city", "location") else "example"


def _schema_type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    return "object" if "properties" in schema else "string"


def schema_instance(schema: Any, key: str = "") -> Any:
    """
    A value satisfying a simple JSON schema: objects get every property
    (and every required key), strings ``"example"`` (``"Tokyo"`` for a key
    named ``city`` or ``location``), numbers and integers ``1``, booleans
    ``true``, arrays one item, enums their first value, ``anyOf``/``oneOf``
    their first branch.
    """
    if not isinstance(schema, Mapping):
        return _string_for(key)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(combinator)
        if isinstance(branches, list) and branches:
            return schema_instance(branches[0], key)
    return _instance_of_type(schema, _schema_type(schema), key)


def _instance_of_type(schema: Mapping[str, Any], kind: str, key: str) -> Any:
    if kind == "object":
        properties = schema.get("properties")
        props = properties if isinstance(properties, Mapping) else {}
        out = {name: schema_instance(sub, name) for name, sub in props.items()}
        required = schema.get("required")
        for name in required if isinstance(required, list) else ():
            if isinstance(name, str) and name not in out:
                out[name] = _string_for(name)
        return out
    if kind == "array":
        return [schema_instance(schema.get("items", {"type": "string"}), key)]
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string_for(key)


# --------------------------------------------------------------------------
# Embeddings


def f32(value: float) -> float:
    """
    ``value`` rounded to the nearest float32, as a Python float (how Go's
    ``float64(float32)`` prints in ``/api/embeddings``).
    """
    rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return rounded


def f32_shortest(value: float) -> float:
    """
    The float32 nearest ``value`` in the shortest decimal that round-trips
    through float32, which is how Go marshals a ``float32`` (``/api/embed``
    values read ``0.010071029``, not ``0.010071029141545296``).
    """
    exact = f32(value)
    for digits in range(1, 10):
        candidate = float(f"{exact:.{digits}g}")
        if f32(candidate) == exact:
            return candidate
    return exact


def raw_embedding(text: str, dimensions: int) -> list[float]:
    """
    The un-normalised vector for ``text``: float32 Gaussian values from a
    generator seeded by the SHA-256 of the text, so equal texts always get
    equal vectors whatever the model.
    """
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    return [f32(rng.gauss(0.0, 1.0)) for _ in range(dimensions)]


def normalized(vector: Sequence[float]) -> list[float]:
    """
    ``vector`` scaled to unit L2 norm, in Go's float32 output form.
    """
    norm = math.sqrt(sum(v * v for v in vector))
    scale = 1.0 / norm if norm > 0 else 0.0
    return [f32_shortest(v * scale) for v in vector]


def embed_vector(text: str, dimensions: int, cut: int = 0) -> list[float]:
    """
    An ``/api/embed`` vector: normalised, then, when ``0 < cut <
    dimensions``, truncated to ``cut`` values and normalised again.
    """
    vector = normalized(raw_embedding(text, dimensions))
    if 0 < cut < dimensions:
        vector = normalized(vector[:cut])
    return vector
