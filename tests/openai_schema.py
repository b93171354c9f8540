"""
Check objects against OpenAI's published schemas, for tests.

The schema logic lives in the shared ``validate_openai.py`` tool, loaded by
path (``$OPENAI_VALIDATOR``, else ``../shared/tools/validate_openai.py`` next
to the repository) so tests and the command-line checker agree on what
"valid" means.  Loading the 3 MB spec takes about a second, so the spec and
each compiled validator are cached for the life of the process.  Without the
tool or the spec, the calling test is skipped on a developer's machine
and fails in CI, where a silent skip would hide every schema check.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

_REPOSITORY = Path(__file__).resolve().parent.parent
_DEFAULT_VALIDATOR = _REPOSITORY.parent / "shared" / "tools" / "validate_openai.py"


def _validator_path() -> Path:
    return Path(os.environ.get("OPENAI_VALIDATOR", str(_DEFAULT_VALIDATOR)))


@functools.cache
def _tool() -> ModuleType | None:
    path = _validator_path()
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("validate_openai", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # pyyaml or jsonschema missing
        return None
    return module


def _spec_path(tool: ModuleType) -> Path | None:
    candidates = [os.environ.get("OPENAI_SPEC", ""), *tool.SPEC_CANDIDATES]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@functools.cache
def _schemas() -> dict[str, Any] | None:
    tool = _tool()
    spec = _spec_path(tool) if tool is not None else None
    if tool is None or spec is None:
        return None
    schemas: dict[str, Any] = tool.load_schemas(str(spec))
    return schemas


@functools.cache
def _validator(schema_name: str) -> Any:
    schemas = _schemas()
    tool = _tool()
    if schemas is None or tool is None:
        message = f"the OpenAI validator or spec is not available ({_validator_path()})"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has shared/ beside the clone
        pytest.skip(message)
    assert schema_name in schemas, f"unknown schema {schema_name!r}"
    return tool.validator_for(schemas, schema_name)


def _wire_form(obj: object) -> Any:
    """``obj`` as a client would parse it: through orjson and back."""
    return json.loads(orjson.dumps(obj))


def problems(schema_name: str, obj: object) -> list[str]:
    """Every way ``obj`` fails ``schema_name`` (empty when valid)."""
    tool = _tool()
    validator = _validator(schema_name)
    assert tool is not None
    found: list[str] = tool.errors_of(validator, _wire_form(obj))
    return found


def assert_valid(schema_name: str, obj: object) -> None:
    """Fail the test unless ``obj`` is valid against ``schema_name``."""
    found = problems(schema_name, obj)
    assert not found, f"{schema_name} violations:\n" + "\n".join(found)


def to_sse(events: Iterable[Mapping[str, Any]], *, done: bool = True) -> str:
    """Chunks framed as the proxy sends them: ``data:`` events, then ``[DONE]``."""
    text = "".join(f"data: {orjson.dumps(event).decode()}\n\n" for event in events)
    return text + ("data: [DONE]\n\n" if done else "")


def assert_valid_sse(schema_name: str, text: str) -> None:
    """
    Fail unless ``text`` is a well-framed SSE stream ending in ``[DONE]``
    whose every event is valid against ``schema_name`` and none is an error.
    """
    tool = _tool()
    _validator(schema_name)
    assert tool is not None
    events = list(tool.parse_sse(text))
    assert events, "the stream has no events"
    datas = [data for _, data in events]
    assert datas[-1].startswith("[DONE]"), "the stream does not end with data: [DONE]"
    for number, data in enumerate(datas[:-1]):
        assert not data.startswith("[DONE]"), f"event {number}: [DONE] before the end"
        body = json.loads(data)
        assert not (isinstance(body, dict) and body.get("error")), f"event {number} is an error"
        found = problems(schema_name, body)
        assert not found, f"event {number}: {schema_name} violations:\n" + "\n".join(found)
