"""
The exception hierarchy: the one place a status, a ``type`` and a ``code``
are decided.

Every layer raises a typed :class:`OProxyError`; the error dialects of
:mod:`oproxy.web.dialects` turn one into what the client reads (OpenAI's
error object, or Ollama's ``{"error": "..."}`` on Ollama's native routes),
and an unexpected exception becomes a :class:`ServerError`, never a
traceback or an HTML page.
"""

from __future__ import annotations

from typing import Any, ClassVar


class OProxyError(Exception):
    """
    An error that the client is told about, in OpenAI's shape.

    Subclasses fix the HTTP status, the error ``type`` and a default
    ``code``; an instance carries the message and, for a bad field, the
    ``param`` that names it (dotted path, as OpenAI does: ``messages.0.role``).
    """

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        """
        The OpenAI ``ErrorResponse`` object: all four keys, always present.
        """
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class InvalidRequest(OProxyError):
    """The request is malformed or a field is missing or of the wrong type."""

    status = 400
    error_type = "invalid_request_error"


class Unauthorized(OProxyError):
    """No key, or a key that is not valid."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(OProxyError):
    """A valid key that may not do this."""

    status = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(OProxyError):
    """No such route or resource."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(OProxyError):
    """No backend serves this model."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str, *, detail: str | None = None) -> None:
        message = f"The model `{model}` does not exist or you do not have access to it."
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message, param="model")
        self.model = model


class MethodNotAllowed(OProxyError):
    """A known route asked for with the wrong HTTP method."""

    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTooLarge(OProxyError):
    """The request body is over the configured cap."""

    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RequestTimeout(OProxyError):
    """The client did not send a request's head or body in time."""

    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class UnsupportedMediaType(OProxyError):
    """A body that is not JSON (by its ``Content-Type``) on a route that takes JSON."""

    status = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(OProxyError):
    """Too many requests or tokens; ``Retry-After`` says when to come back."""

    status = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class TokenRateLimited(RateLimited):
    """Too many tokens per minute (OpenAI says ``tokens`` where requests say ``requests``)."""

    error_type = "tokens"


class UpstreamError(OProxyError):
    """The upstream answered with an error it did not explain as the client's fault."""

    status = 502
    error_type = "api_error"
    default_code = "upstream_error"


class UpstreamUnavailable(OProxyError):
    """The upstream could not be reached at all (refused, reset, DNS)."""

    status = 502
    error_type = "api_error"
    default_code = "upstream_unavailable"


class UpstreamBusy(OProxyError):
    """The upstream said it is overloaded; worth retrying later."""

    status = 503
    error_type = "api_error"
    default_code = "upstream_busy"


class UpstreamTimeout(OProxyError):
    """The upstream did not connect, answer or continue within its timeout."""

    status = 504
    error_type = "api_error"
    default_code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """The upstream did not accept a connection in time: another backend may."""


class ServerError(OProxyError):
    """Something unexpected; details are in the log under the request id."""

    status = 500
    error_type = "server_error"

    def __init__(
        self, message: str = "The server had an error while processing your request."
    ) -> None:
        super().__init__(message)


class PluginFailed(OProxyError):
    """
    A plugin configured with ``on_error: reject`` failed or timed out on
    this request; what went wrong is in the log under the request id.
    """

    status = 500
    error_type = "server_error"
    default_code = "plugin_failed"

    def __init__(self, plugin: str, *, timed_out: bool = False) -> None:
        what = "did not answer in time" if timed_out else "failed"
        super().__init__(
            f"The plugin {plugin!r} {what} while processing your request.",
            code="plugin_timeout" if timed_out else None,
        )


class QuotaExceeded(OProxyError):
    """A token quota is used up until its period ends: retrying sooner cannot help."""

    status = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class StoreUnavailable(OProxyError):
    """The state store (keys, limits, quotas) did not answer, and the proxy fails closed."""

    status = 503
    error_type = "server_error"
    default_code = "state_store_unavailable"


class BackendsDown(OProxyError):
    """Every backend serving a model is out (circuit open): fail fast, say when to retry."""

    status = 503
    error_type = "server_error"
    default_code = "backends_unavailable"

    def __init__(self, model: str, backends: list[str], retry_after: float) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(
            f"Every backend serving the model `{model}` is down or failing it "
            f"({', '.join(sorted(set(backends)))}). Please try again in {seconds}s.",
            headers={"retry-after": str(seconds)},
        )


# -- answers from an Ollama backend, passed on as they were -------------------------


class Answered(OProxyError):
    """
    An error answer from an Ollama backend, kept as it was: a native client
    gets Ollama's own status and message, as if it had asked Ollama.

    The subclasses place it in the hierarchy, so that dispatch still moves
    on to another backend after a 5xx, and the OpenAI rendering (if it is
    ever used) still makes sense.
    """

    def __init__(self, status: int, message: str, backend: str) -> None:
        super().__init__(f"backend {backend!r} answered HTTP {status}: {message}")
        self.answered_status = status
        self.answered_message = message


class AnsweredRefusal(Answered, InvalidRequest):
    """A 4xx: the request's fault, which another backend would repeat."""


class AnsweredBusy(Answered, UpstreamBusy):
    """A 429 or 503: this backend is overloaded, another may not be."""


class AnsweredFailure(Answered, UpstreamError):
    """A 5xx: this backend failed, another may not."""
