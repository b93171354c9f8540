"""
What the fake Ollama's ``/api/create`` and ``/api/push`` report, worked out
from the Go server (``server/create.go``, ``server/images.go``,
``server/upload.go``, ``manifest/layer.go``), whose messages differ from the
examples in ``docs/api.md``: the code wins.

``/api/create`` from an installed model lists every layer of the new
manifest in order (the source's layers first, then the new template,
system, license, params and messages layers, each replacing a layer of its
kind), as ``using existing layer sha256:<hex>`` or ``creating new layer
sha256:<hex>`` depending on whether the blob is already on disk, then
``writing manifest``; the handler adds ``success``.  ``/api/push`` sends
``retrieving manifest``, one ``pushing <12 hex>`` series per blob (config
last) and ``pushing manifest``.

Everything here is pure; the handlers in :mod:`oproxy.testing.ollama.server`
put it on the wire.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Final

from oproxy.testing.ollama.gojson import json_kind
from oproxy.testing.ollama.models import (
    LICENSE_MEDIA,
    MESSAGES_MEDIA,
    PARAMS_MEDIA,
    SYSTEM_MEDIA,
    TEMPLATE_MEDIA,
    FakeModel,
    Layer,
    ModelName,
)
from oproxy.testing.ollama.requests import RequestError
from oproxy.testing.ollama.wire import go_json, go_quote

MODELS_DIR: Final = "/root/.ollama/models"
"""Where the fake pretends ``OLLAMA_MODELS`` is (it appears in Go's file errors)."""

PULL_MISSING: Final = "pull model manifest: file does not exist"
NEITHER_FROM_NOR_FILES: Final = "neither 'from' or 'files' was specified"
_DIGEST_CHARS: Final = frozenset("0123456789abcdefABCDEF")


# --------------------------------------------------------------------------
# /api/create


def check_create_request(req: Mapping[str, Any]) -> None:
    """
    The checks ``CreateHandler`` makes before it starts (all 400, sent as
    ``AbortWithStatusJSON``): relative file paths, non-empty digests, a
    draft quantization only with draft files.
    """
    for key in ("files", "draft_files"):
        for path, digest in (req.get(key) or {}).items():
            if not _valid_path(path):
                raise RequestError(400, "file path must be relative")
            if not digest:
                raise RequestError(400, "invalid digest format")
    if req.get("draft_quantize") and not req.get("draft_files"):
        raise RequestError(400, "--draft-quantize requires a DRAFT model")
    if any(not digest for digest in (req.get("adapters") or {}).values()):
        raise RequestError(400, "invalid digest format")


def _valid_path(path: str) -> bool:
    """
    Go's ``io/fs.ValidPath``: unrooted, slash-separated, no empty, ``.``
    or ``..`` element (``.`` alone is the root and valid).
    """
    if path == ".":
        return True
    return all(part not in ("", ".", "..") for part in path.split("/"))


def files_outcome(files: Mapping[str, Any]) -> tuple[list[dict[str, Any]], RequestError]:
    """
    How a create from ``files`` ends on the fake, which keeps no blobs: as
    Ollama's does when the blobs were never uploaded.  A ``.gguf`` (or
    ``.safetensors``) name makes it read the blob, which is missing (500);
    otherwise it cannot tell the type (400 ``unknown type``).
    """
    paths = sorted(files)
    if not any(path.endswith((".gguf", ".safetensors")) for path in paths):
        return [], RequestError(400, "unknown type")
    gguf = any(path.endswith(".gguf") for path in paths)
    lines = [{"status": "parsing GGUF"}] if gguf else []
    digest: str = files[paths[0]] or ""
    if not _is_digest(digest):
        return lines, RequestError(500, "invalid digest format")
    blob = f"{MODELS_DIR}/blobs/{digest.replace(':', '-')}"
    return lines, RequestError(500, f"open {blob}: no such file or directory")


def _is_digest(text: str) -> bool:
    hexpart = text[7:]
    return (
        text[:7] in ("sha256:", "sha256-") and len(hexpart) == 64 and set(hexpart) <= _DIGEST_CHARS
    )


def create_model(
    base: FakeModel,
    name: ModelName,
    req: Mapping[str, Any],
    blobs: Iterable[str],
    modified_at: str,
) -> tuple[FakeModel, list[dict[str, Any]]]:
    """
    The model ``/api/create`` makes from ``base``, and its progress lines
    up to ``writing manifest``.

    :param blobs: digests of the blobs already on disk.
    :raises RequestError: a template that does not parse (400), a license
        that is neither a string nor a list of strings (500).
    """
    known = set(blobs)
    layers: list[tuple[Layer, bool]] = [(layer, False) for layer in base.blob_layers()]

    def put(media: str, content: bytes, *, only: bool = True) -> None:
        if only:
            layers[:] = [item for item in layers if item[0].media_type != media]
        digest = hashlib.sha256(content).hexdigest()
        layers.append((Layer(media, digest, len(content)), digest not in known))
        known.add(digest)

    template: str = req.get("template", "")
    if template:
        check_template(template)
        put(TEMPLATE_MEDIA, template.encode())
    system: str = req.get("system", "")
    if system:
        put(SYSTEM_MEDIA, system.encode())
    for text in licenses(req.get("license")):
        put(LICENSE_MEDIA, text.encode(), only=False)
    requested: dict[str, Any] = req.get("parameters") or {}
    merged = {**_base_parameters(base), **requested}
    if requested:
        put(PARAMS_MEDIA, go_json(dict(sorted(merged.items()))) + b"\n")
    else:
        # Ollama re-encodes the same parameters: the same blob, moved last.
        params = [item for item in layers if item[0].media_type == PARAMS_MEDIA]
        layers[:] = [item for item in layers if item[0].media_type != PARAMS_MEDIA] + params
    messages: list[Any] = req.get("messages") or []
    if messages:
        put(MESSAGES_MEDIA, go_json(messages) + b"\n")

    final = tuple(layer for layer, _ in layers)
    manifest = hashlib.sha256("\n".join(layer.digest for layer in final).encode()).hexdigest()
    model = replace(
        base,
        name=name.display,
        modified_at=modified_at,
        digest=manifest,
        size=sum(layer.size for layer in final),
        template=template or base.template,
        system=system or base.system,
        parameters=_parameter_lines(merged),
        layers=final,
    )
    lines = [
        {"status": f"{'creating new' if new else 'using existing'} layer sha256:{layer.digest}"}
        for layer, new in layers
    ]
    return model, [*lines, {"status": "writing manifest"}]


def check_template(template: str) -> None:
    """
    The one template error the fake recognises: an action opened with
    ``{{`` and never closed (Go's ``text/template``: ``template: :LINE:
    unclosed action``, wrapped as a 400 ``template error``).
    """
    start = template.rfind("{{")
    if start >= 0 and "}" not in template[start:]:
        line = template.count("\n", 0, start) + 1
        raise RequestError(400, f"template error: template: :{line}: unclosed action")


def licenses(value: Any) -> list[str]:
    """
    ``license`` as ``createModel`` reads it: a string, or a list of strings
    (decoded again with Go's ``encoding/json``, hence its messages).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list):
        raise RequestError(
            500, f"json: cannot unmarshal {json_kind(value)} into Go value of type []string"
        )
    for item in value:
        if not isinstance(item, str):
            kind = json_kind(item)
            raise RequestError(500, f"json: cannot unmarshal {kind} into Go value of type string")
    return list(value)


def _base_parameters(model: FakeModel) -> dict[str, Any]:
    """
    A model's parameters as the JSON its params blob holds (``stop`` and
    repeated names are lists).
    """
    merged: dict[str, Any] = {}
    for key, text in model.parameters:
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if key == "stop" or key in merged:
            previous = merged.get(key, [])
            merged[key] = [*(previous if isinstance(previous, list) else [previous]), value]
        else:
            merged[key] = value
    return merged


def _parameter_lines(parameters: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """
    Parameters as ``/api/show`` prints them (Go's ``%#v``): one line per
    value, a list giving one line per element.
    """
    lines: list[tuple[str, str]] = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append((key, _go_value(item)))
    return tuple(lines)


def _go_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    return go_json(value).decode()


# --------------------------------------------------------------------------
# /api/push


def push_progress(
    model: FakeModel, pushed: Iterable[tuple[str, str]]
) -> tuple[list[dict[str, Any]], set[tuple[str, str]]]:
    """
    The lines of a push after ``retrieving manifest`` and before
    ``success``, and the ``(repository, digest)`` pairs the registry then
    holds.  A blob the registry has (pushed before to the same
    repository) gives one complete ``pushing`` line; a new one a start
    (``completed`` omitted while 0), half-way and complete line.
    """
    held = set(pushed)
    repository = model.parsed.key.rsplit(":", 1)[0]
    lines: list[dict[str, Any]] = []
    uploaded: set[tuple[str, str]] = set()
    for layer in (*model.blob_layers(), model.config_layer()):
        digest, total = layer.digest, layer.size
        head = {"status": f"pushing {digest[:12]}", "digest": f"sha256:{digest}", "total": total}
        if (repository, digest) not in held:
            lines += [head, {**head, "completed": max(total // 2, 1)}]
        lines.append({**head, "completed": total})
        uploaded.add((repository, digest))
    lines.append({"status": "pushing manifest"})
    return lines, uploaded


def push_missing(name: str) -> str:
    """
    Why a push of a model that is not installed fails: the manifest file
    cannot be opened (or, for an invalid name, is not even looked for).
    """
    parsed = ModelName.parse(name)
    if not parsed.is_valid():
        return f"unqualified name: {parsed.full}"
    path = f"{parsed.host}/{parsed.namespace}/{parsed.model}/{parsed.tag}"
    return f"open {MODELS_DIR}/manifests/{path}: no such file or directory"


__all__ = [
    "MODELS_DIR",
    "NEITHER_FROM_NOR_FILES",
    "PULL_MISSING",
    "check_create_request",
    "check_template",
    "create_model",
    "files_outcome",
    "licenses",
    "push_missing",
    "push_progress",
]
