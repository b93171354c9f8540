"""
What the JSON access log says about one request, written after its answer
was sent (the pipeline's last step).

The key's name, never the key; bodies only when the configuration asks,
redacted and capped.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from oproxy.api.scope import Scope
from oproxy.logs import body_for_log


def access_record(
    request: IRequest,
    request_id: str,
    scope: Scope | None,
    status: int,
    started: float,
    elapsed: float,
    error_kind: str | None,
) -> dict[str, Any]:
    """
    One access log line.  The key's name, never the key; no bodies.
    """
    address = request.getClientAddress()
    return {
        "time": started,
        "request_id": request_id,
        "key": scope.key_name if scope is not None else None,
        "client": getattr(address, "host", None),
        "method": request.method.decode("latin-1"),
        "path": request.path.decode("latin-1"),
        "model": scope.model_label if scope is not None else None,
        "backend": scope.backend_label if scope is not None else None,
        "status": status,
        "latency_seconds": round(elapsed, 6),
        "first_token_seconds": (
            round(scope.first_token_seconds, 6)
            if scope is not None and scope.first_token_seconds is not None
            else None
        ),
        "prompt_tokens": scope.prompt_tokens if scope is not None else None,
        "completion_tokens": scope.completion_tokens if scope is not None else None,
        "cache": scope.cache_status if scope is not None else None,
        "error": error_kind,
        **_logged_bodies(scope),
    }


def _logged_bodies(scope: Scope | None) -> dict[str, Any]:
    """Request and response bodies, when configured: redacted and capped."""
    if scope is None or not scope.logs_bodies or scope.config.access_log is None:
        return {}
    settings = scope.config.access_log
    keys = frozenset(k.lower() for k in settings.redact)
    return {
        "request_body": body_for_log(scope.body, keys, settings.body_max_bytes),
        "response_body": (
            body_for_log(scope.logged_response, keys, settings.body_max_bytes)
            if scope.logged_response is not None
            else None
        ),
    }
