"""
How the fake OpenAI server reads requests and refuses bad ones: OpenAI's
error object, its messages for the common mistakes, and the bearer-key
check.

The checks are the ones a client or a proxy can get wrong and should be
told about (missing fields, wrong types, ``stream_options`` without
``stream``), not the whole of OpenAI's validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from oproxy.testing.base.kinds import Kind, kind_of

ROLES: Final = frozenset(("developer", "system", "user", "assistant", "tool", "function"))
KEYS_PAGE: Final = "https://platform.openai.com/account/api-keys"


class APIError(Exception):
    """
    An OpenAI error answer: status, the four-key error object, headers.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def injected_error(status: int, message: str | None, retry_after: float | None) -> APIError:
    """
    The error an injected failure answers with, shaped as OpenAI shapes it
    for that status (429 with ``Retry-After``, 5xx ``server_error``).
    """
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    if status == 429:
        return APIError(
            429,
            message or "Rate limit reached for requests. Please try again in 1s.",
            type="requests",
            code="rate_limit_exceeded",
            headers=headers or {"retry-after": "1"},
        )
    if status == 401:
        return APIError(401, message or "Incorrect API key provided.", code="invalid_api_key")
    if status == 404:
        return APIError(404, message or "Not found.", code="not_found")
    if status == 503:
        return APIError(
            503,
            message or "The engine is currently overloaded, please try again later",
            type="server_error",
            headers=headers,
        )
    if status >= 500:
        return APIError(
            status,
            message or "The server had an error while processing your request. Sorry about that!",
            type="server_error",
            headers=headers,
        )
    return APIError(status, message or f"Injected failure ({status}).", headers=headers)


# --------------------------------------------------------------------------
# Authentication


def check_key(expected: str | None, authorization: bytes | None) -> None:
    """
    Refuse a request without ``Authorization: Bearer <expected>`` (when a
    key is configured), with OpenAI's two 401 answers.
    """
    if expected is None:
        return
    given = (authorization or b"").decode("latin-1")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). "
            f"You can obtain an API key from {KEYS_PAGE}.",
        )
    key = key.strip()
    if key != expected:
        shown = f"{key[:3]}***{key[-4:]}" if len(key) > 8 else "***"
        raise APIError(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at {KEYS_PAGE}.",
            code="invalid_api_key",
        )


# --------------------------------------------------------------------------
# Bodies and fields


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


_DESCRIPTIONS: Final[dict[Kind, str]] = {
    "boolean": "a boolean",
    "integer": "an integer",
    "number": "a decimal",
    "string": "a string",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _invalid(param: str, message: str, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


def _wrong_type(param: str, expected: str, value: object) -> APIError:
    got = _DESCRIPTIONS[kind_of(value)]
    message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
    return _invalid(param, message, "invalid_type")


def _missing(param: str) -> APIError:
    message = f"Missing required parameter: '{param}'."
    return _invalid(param, message, "missing_required_parameter")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a model parameter")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    return model


def check_integer(
    body: Mapping[str, Any], key: str, minimum: int, maximum: int | None = None
) -> None:
    value = body.get(key)
    if value is None:
        return
    if not _is_int(value):
        raise _wrong_type(key, "an integer", value)
    if value < minimum:
        raise APIError(
            400,
            f"Invalid '{key}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            param=key,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise APIError(
            400,
            f"Invalid '{key}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            param=key,
            code="integer_above_max_value",
        )


def check_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """
    ``stream`` and ``stream_options.include_usage``; options without a
    stream are refused, as OpenAI (and vLLM) refuse them.
    """
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    if not stream:
        raise APIError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _wrong_type("stream_options.include_usage", "a boolean", include)
    return True, include is True


def check_chat(body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise APIError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{index}]", "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"messages[{index}].role")
        if role not in ROLES:
            raise APIError(
                400,
                f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', "
                "'user', 'function', 'tool', and 'developer'.",
                param=f"messages[{index}].role",
                code="invalid_value",
            )
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _wrong_type("tools", "an array", tools)
    check_integer(body, "max_tokens", 1)
    check_integer(body, "max_completion_tokens", 1)
    check_integer(body, "n", 1, 128)


def _is_prompt(value: object) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(_is_int(v) for v in value):
        return True
    return all(
        isinstance(v, str) or (isinstance(v, list) and v and all(_is_int(t) for t in v))
        for v in value
    )


def check_completion(body: Mapping[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if not _is_prompt(prompt):
        raise APIError(
            400, "Invalid prompt: expected a string, an array of strings or tokens.", param="prompt"
        )
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _wrong_type("echo", "a boolean", echo)
    check_integer(body, "max_tokens", 0)
    check_integer(body, "n", 1, 128)


def check_embeddings(body: Mapping[str, Any]) -> str:
    """Validate an embeddings request; return its ``encoding_format``."""
    value = body.get("input")
    if value is None:
        raise _missing("input")
    if value == "" or (isinstance(value, list) and "" in value) or not _is_prompt(value):
        raise APIError(
            400,
            "'$.input' is invalid. Please check the API reference: "
            "https://platform.openai.com/docs/api-reference.",
            param="input",
        )
    check_integer(body, "dimensions", 1)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise APIError(
            400,
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64'].",
            param="encoding_format",
            code="invalid_value",
        )
    return str(encoding)
