"""
The configuration page's JSON: the file (secrets masked), Validate and
Apply (:mod:`oproxy.console.editor` does the file work, in a thread).
"""

from __future__ import annotations

from typing import Any

from oproxy.api.scope import Scope
from oproxy.console.access import console_of
from oproxy.console.editor import (
    Conflict,
    Refused,
    Version,
    check_text,
    checked,
    commit,
    read_version,
    restart_notes,
    unmask,
)
from oproxy.console.parts import Console
from oproxy.errors import InvalidRequest


async def show(scope: Scope) -> bytes | None:
    """``GET /ui/api/config``: the file as the editor shows it."""
    console = console_of(scope.services)
    version: Version = await console.in_thread(read_version, console.config_path)
    return scope.json(version.to_json())


def _submitted(scope: Scope) -> tuple[str, str]:
    text = check_text(scope.body.get("text"))
    base = scope.body.get("base")
    if not isinstance(base, str):
        raise InvalidRequest("base must be the digest of the version the editor loaded")
    return text, base


async def validate(scope: Scope) -> bytes | None:
    """
    ``POST /ui/api/config/validate`` with ``{"text", "base"}``: the checks
    of ``oproxy check-config`` (and of a reload), each problem with its
    line; nothing is written.
    """
    console = console_of(scope.services)
    text, base = _submitted(scope)
    full = await _unmasked(console, text, base)
    found, config = await console.in_thread(checked, full, console.load)
    notes = restart_notes(config, scope.config) if config is not None else []
    return scope.json(
        {"valid": not found, "problems": [p.to_json() for p in found], "notes": notes}
    )


async def _unmasked(console: Console, text: str, base: str) -> str:
    """The text with its masked secrets back, from the version it was loaded from."""
    if console.config_path is None:
        return text
    version: Version = await console.in_thread(read_version, console.config_path)
    if version.digest != base and "[masked:" in text:
        raise Conflict(
            "The file changed since you loaded it, so its masked values cannot be read. "
            "Reload the page.",
            code="configuration_changed",
        )
    return unmask(text, version.secrets)


async def apply(scope: Scope) -> bytes | None:
    """
    ``POST /ui/api/config/apply`` with ``{"text", "base"}``: the file
    replaced (if it is still ``base`` and the new text is valid), then
    every worker reloaded.  A refusal changes nothing and says why.
    """
    console = console_of(scope.services)
    text, base = _submitted(scope)
    try:
        applied = await console.in_thread(
            commit, console.config_path, console.lock_path, text, base, console.load, scope.config
        )
    except Refused as e:
        return scope.json(
            {**e.to_body(), "problems": [p.to_json() for p in e.problems]}, status=e.status
        )
    reloaded = await console.reload_all() if console.reload_all is not None else False
    message = (
        "Applied: the configuration was written and every worker reloaded it."
        if reloaded
        else f"Written to {console.config_path}, but the reload could not be confirmed: "
        "see the daemon's log."
    )
    answer: dict[str, Any] = {
        "applied": True,
        "reloaded": reloaded,
        "digest": applied.digest,
        "backup": applied.backup,
        "notes": applied.notes,
        "message": message,
    }
    return scope.json(answer)
