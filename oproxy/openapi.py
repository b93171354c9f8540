"""
The OpenAPI 3.1 document for every route oproxy serves.

The OpenAI routes are described in OpenAI's own terms, trimmed to what this
gateway accepts and returns; the operational routes (health, metrics) are
oproxy's.  Built once, as data, so the document is a function of the code.
"""

from __future__ import annotations

from typing import Any

from oproxy import __version__

_ERROR = {"$ref": "#/components/responses/Error"}

_COMMON_ERRORS = {
    "400": _ERROR,
    "401": _ERROR,
    "403": _ERROR,
    "404": _ERROR,
    "413": _ERROR,
    "429": _ERROR,
    "500": _ERROR,
    "502": _ERROR,
    "503": _ERROR,
    "504": _ERROR,
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _post(summary: str, request: str, response: str, *, streams: bool, tag: str) -> dict[str, Any]:
    content = _json(_ref(response))
    if streams:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "Server-sent events: `data: {chunk}` lines, then `data: [DONE]`.",
            }
        }
    return {
        "post": {
            "summary": summary,
            "tags": [tag],
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": {
                "200": {"description": "The answer.", "content": content},
                **_COMMON_ERRORS,
            },
        }
    }


def _get(
    summary: str, response: dict[str, Any], *, tag: str, secured: bool = True
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": {"description": "OK", "content": _json(response)}, **_COMMON_ERRORS},
    }
    if not secured:
        operation["security"] = []
    return {"get": operation}


# Schema fragments that recur: one object each, shared by every place that means it.
_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOLEAN = {"type": "boolean"}
_OBJECT = {"type": "object"}
_STRINGS = {"type": "array", "items": _STRING}
_OBJECTS = {"type": "array", "items": _OBJECT}
_NAME = {"type": "string", "minLength": 1}
_MAYBE_STRING = {"type": ["string", "null"]}
_TEXTS = {"oneOf": [_STRING, _STRINGS]}
_TEXT_OR_BLOCKS = {"oneOf": [_STRING, _OBJECTS]}
_STRING_OR_OBJECT = {"oneOf": [_STRING, _OBJECT]}
_POSITIVE = {"type": "integer", "minimum": 1}
_TEMPERATURE = {"type": "number", "minimum": 0, "maximum": 2}
_TOP_P = {"type": "number", "minimum": 0, "maximum": 1}


_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "description": "Text, or a list of text and image_url parts; null for tool-call turns.",
            "oneOf": [
                _STRING,
                _OBJECTS,
                {"type": "null"},
            ],
        },
        "tool_calls": _OBJECTS,
        "tool_call_id": _STRING,
        "name": _STRING,
    },
}

_CHOICES = {
    "type": "integer",
    "minimum": 1,
    "description": (
        "Choices to generate, run as separate generations on the backend; "
        "at most the server's limits.max_n (8 by default)."
    ),
}

_OPTIONS = {
    "type": "object",
    "description": "Ollama options passed through (num_ctx, top_k, keep_alive, ...).",
    "additionalProperties": True,
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": _INTEGER,
        "completion_tokens": _INTEGER,
        "total_tokens": _INTEGER,
    },
}


def _request(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """A request body: an object that names its model first, then its own fields."""
    return {
        "type": "object",
        "required": ["model", *required],
        "properties": {"model": _NAME, **properties},
    }


def _completion(kind: str, *, fingerprint: bool) -> dict[str, Any]:
    """A completion, chat or text: one envelope, told apart by its ``object``."""
    properties: dict[str, Any] = {
        "id": _STRING,
        "object": {"const": kind},
        "created": _INTEGER,
        "model": _STRING,
    }
    if fingerprint:
        properties["system_fingerprint"] = _STRING
    properties.update(choices=_OBJECTS, usage=_USAGE)
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": properties,
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": _STRING,
                    "type": _STRING,
                    "param": _MAYBE_STRING,
                    "code": _MAYBE_STRING,
                },
            }
        },
    },
    "ChatCompletionRequest": _request(
        ["messages"],
        {
            "messages": {"type": "array", "items": _MESSAGE},
            "stream": _BOOLEAN,
            "stream_options": _OBJECT,
            "temperature": _TEMPERATURE,
            "top_p": _TOP_P,
            "seed": _INTEGER,
            "n": _CHOICES,
            "stop": _TEXTS,
            "max_tokens": _POSITIVE,
            "max_completion_tokens": _POSITIVE,
            "frequency_penalty": _NUMBER,
            "presence_penalty": _NUMBER,
            "tools": _OBJECTS,
            "tool_choice": _STRING_OR_OBJECT,
            "response_format": _OBJECT,
            "reasoning_effort": _STRING,
            "logprobs": _BOOLEAN,
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "options": _OPTIONS,
            "keep_alive": {"oneOf": [_STRING, _NUMBER]},
        },
    ),
    "ChatCompletion": _completion("chat.completion", fingerprint=True),
    "CompletionRequest": _request(
        ["prompt"],
        {
            "prompt": _TEXTS,
            "suffix": _STRING,
            "echo": _BOOLEAN,
            "stream": _BOOLEAN,
            "n": _CHOICES,
            "best_of": {"type": "integer", "minimum": 1, "description": "Must equal n."},
            "max_tokens": _POSITIVE,
            "temperature": _TEMPERATURE,
            "logprobs": {"type": "integer", "minimum": 0},
            "options": _OPTIONS,
        },
    ),
    "Completion": _completion("text_completion", fingerprint=False),
    "EmbeddingRequest": _request(
        ["input"],
        {
            "input": _TEXTS,
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": _POSITIVE,
        },
    ),
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": _OBJECTS,
            "model": _STRING,
            "usage": _USAGE,
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": _STRING,
            "object": {"const": "model"},
            "created": _INTEGER,
            "owned_by": _STRING,
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "uptime_seconds", "workers", "backends"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
            "version": _STRING,
            "uptime_seconds": _NUMBER,
            "workers": _INTEGER,
            "backends": _OBJECTS,
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": _STRING},
    },
    "Key": {
        "type": "object",
        "required": ["id", "name", "status", "created", "policy"],
        "properties": {
            "id": _STRING,
            "name": _STRING,
            "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
            "created": {"type": "string", "format": "date-time"},
            "revoked": {"type": ["string", "null"], "format": "date-time"},
            "policy": _OBJECT,
            "key": {"type": "string", "description": "Only when created or rotated."},
        },
    },
    "KeyList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}},
        },
    },
    "KeyRequest": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": _NAME,
            "models": _STRINGS,
            "networks": _STRINGS,
            "expires": {"type": ["number", "string"]},
            "limits": {
                "type": "object",
                "properties": {
                    name: _POSITIVE
                    for name in ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")
                },
                "additionalProperties": False,
            },
            "model_limits": _OBJECT,
            "admin": _BOOLEAN,
        },
        "additionalProperties": False,
    },
}


def _admin_paths() -> dict[str, Any]:
    """Key management: the same operations as ``oproxy keys``, for admin keys."""
    key_id = {
        "name": "key_id",
        "in": "path",
        "required": True,
        "description": "The key's public id (the part after `sk-oproxy-`).",
        "schema": _STRING,
    }

    def operation(summary: str, status: str, **extra: Any) -> dict[str, Any]:
        return {
            "summary": summary,
            "tags": ["Admin"],
            "responses": {
                status: {"description": "OK", "content": _json(_ref("Key"))},
                **_COMMON_ERRORS,
            },
            **extra,
        }

    return {
        "/admin/keys": {
            "get": {
                **operation("List keys (never their secrets)", "200"),
                "responses": {
                    "200": {"description": "OK", "content": _json(_ref("KeyList"))},
                    **_COMMON_ERRORS,
                },
            },
            "post": operation(
                "Create a key; the answer holds it, once",
                "201",
                requestBody={"required": True, "content": _json(_ref("KeyRequest"))},
            ),
        },
        "/admin/keys/{key_id}": {
            "parameters": [key_id],
            "get": operation("Show a key", "200"),
            "delete": operation("Revoke a key", "200"),
        },
        "/admin/keys/{key_id}/rotate": {
            "parameters": [key_id],
            "post": operation("Give a key a new secret; the answer holds it, once", "200"),
        },
    }


def _console_paths() -> dict[str, Any]:
    """
    The admin console (``/ui/``): its pages, and their figures as JSON.  A
    session cookie from ``POST /ui/login`` (an admin key) is the credential;
    every change also sends the session's CSRF token.
    """
    session: list[dict[str, list[str]]] = [{"consoleSession": []}]
    csrf = {
        "name": "X-CSRF-Token",
        "in": "header",
        "required": True,
        "description": "The session's CSRF token (the `csrf-token` meta tag of every page).",
        "schema": _STRING,
    }
    errors = {"401": _ERROR, "403": _ERROR, "404": _ERROR, "500": _ERROR}

    def get(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """A console GET: signed in by the session; a page and its JSON differ in answers."""
        return {
            "get": {
                "summary": summary,
                "tags": ["Console"],
                "security": session,
                "responses": responses,
                **extra,
            }
        }

    def page(summary: str) -> dict[str, Any]:
        return get(
            summary,
            {
                "200": {"description": "The page.", "content": {"text/html": {}}},
                "303": {"description": "Not signed in: to the sign-in page."},
            },
        )

    def read(summary: str, **extra: Any) -> dict[str, Any]:
        return get(
            summary, {"200": {"description": "OK", "content": _json(_OBJECT)}, **errors}, **extra
        )

    def change(summary: str, body: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "tags": ["Console"],
            "security": session,
            "parameters": [csrf],
            "responses": {
                "200": {"description": "OK", "content": _json(_OBJECT)},
                "400": _ERROR,
                "409": _ERROR,
                "413": _ERROR,
                **errors,
            },
            **extra,
        }
        if body is not None:
            operation["requestBody"] = {"required": True, "content": _json(body)}
        return {"post": operation}

    model = {
        "type": "object",
        "required": ["model"],
        "properties": {"model": _STRING, "backend": _STRING},
    }
    text = {
        "type": "object",
        "required": ["text", "base"],
        "properties": {
            "text": {"type": "string", "description": "The file; masked secrets as shown."},
            "base": {"type": "string", "description": "The digest of the version loaded."},
        },
    }
    key_id = {"name": "key_id", "in": "path", "required": True, "schema": _STRING}
    request_id = {
        "name": "request_id",
        "in": "path",
        "required": True,
        "schema": _STRING,
    }
    return {
        "/ui/login": {
            "get": {
                "summary": "The sign-in page",
                "tags": ["Console"],
                "security": [],
                "responses": {"200": {"description": "The page.", "content": {"text/html": {}}}},
            },
            "post": {
                "summary": "Sign in with an admin key (a form: key, next)",
                "tags": ["Console"],
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "key": _STRING,
                                    "next": _STRING,
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "303": {"description": "Signed in: the session cookie is set."},
                    "401": {"description": "Not a key.", "content": {"text/html": {}}},
                    "403": {"description": "Not an admin key.", "content": {"text/html": {}}},
                    "429": {"description": "Too many attempts.", "content": {"text/html": {}}},
                },
            },
        },
        "/ui/logout": {
            "post": {
                "summary": "Sign out (a form with csrf_token)",
                "tags": ["Console"],
                "security": session,
                "responses": {"303": {"description": "Signed out."}},
            }
        },
        "/ui/": page("The dashboard"),
        "/ui/models": page("Models"),
        "/ui/keys": page("Keys"),
        "/ui/configuration": page("Configuration"),
        "/ui/requests": page("Requests"),
        "/ui/requests/{request_id}": {"parameters": [request_id], **page("A request's record")},
        "/ui/static/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STRING}],
            "get": {
                "summary": "The console's packaged scripts and style sheet",
                "tags": ["Console"],
                "security": [],
                "responses": {"200": {"description": "The file."}, "404": _ERROR},
            },
        },
        "/ui/api/dashboard": read(
            "Totals since the start (metrics), the last hour per minute and the recent "
            "requests (access log), the backends"
        ),
        "/ui/api/requests": read(
            "Recent requests, newest first",
            parameters=[
                {"name": name, "in": "query", "required": False, "schema": _STRING}
                for name in ("key", "model", "status", "limit")
            ],
        ),
        "/ui/api/requests/{request_id}": {
            "parameters": [request_id],
            **read("One recent request's access log record"),
        },
        "/ui/api/models": read("Every backend's models, and the configured aliases"),
        "/ui/api/models/pull": change(
            "Pull a model onto an Ollama backend; progress streams as NDJSON", model
        ),
        "/ui/api/models/delete": change("Delete a model from a backend", model),
        "/ui/api/models/load": change("Load a model into memory", model),
        "/ui/api/models/unload": change("Unload a model from memory", model),
        "/ui/api/keys": {
            **read("Every key, with its usage against its quotas and its last use"),
            **change("Create a key; the answer holds it, once", _ref("KeyRequest")),
        },
        "/ui/api/keys/{key_id}/revoke": {"parameters": [key_id], **change("Revoke a key")},
        "/ui/api/keys/{key_id}/rotate": {
            "parameters": [key_id],
            **change("Give a key a new secret; the answer holds it, once"),
        },
        "/ui/api/config": read("The configuration file, its secrets masked"),
        "/ui/api/config/validate": change("Validate a configuration (nothing is written)", text),
        "/ui/api/config/apply": change(
            "Write the configuration (kept as .bak before) and reload every worker", text
        ),
    }


def _model_loading_paths() -> dict[str, Any]:
    """``/admin/models/load`` and ``/admin/models/unload``."""
    request = {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "description": "The model, as clients name it."},
            "backend": {
                "type": "string",
                "description": "One backend; without it, every backend that can and lists it.",
            },
        },
    }
    answer = {
        "type": "object",
        "required": ["object", "action", "model", "backends"],
        "properties": {
            "object": {"type": "string", "const": "model.action"},
            "action": {"type": "string", "enum": ["load", "unload"]},
            "model": _STRING,
            "backends": _STRINGS,
        },
    }

    def operation(summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "tags": ["Admin"],
                "requestBody": {"required": True, "content": _json(request)},
                "responses": {
                    "200": {"description": "OK", "content": _json(answer)},
                    **_COMMON_ERRORS,
                },
            }
        }

    return {
        "/admin/models/load": operation(
            "Load a model into the memory of the backends that can (LM Studio, Ollama)"
        ),
        "/admin/models/unload": operation("Take a model out of the backends' memory"),
    }


_OLLAMA_ERROR = {"$ref": "#/components/responses/OllamaError"}

_OLLAMA_ERRORS = {
    status: _OLLAMA_ERROR
    for status in ("400", "401", "403", "404", "413", "429", "500", "502", "503", "504")
}

_OLLAMA_BODY = {
    "type": "object",
    "description": "Ollama's own request body, passed through; `model` is routed.",
    "additionalProperties": True,
}

_OLLAMA_MODELS = {
    "type": "object",
    "required": ["models"],
    "properties": {"models": _OBJECTS},
}


def _ollama_operation(
    summary: str,
    *,
    body: dict[str, Any] | None = None,
    streams: bool = False,
    admin: bool = False,
    answer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One native route, described in Ollama's terms (its errors: ``{"error": "..."}``)."""
    content: dict[str, Any] = _json(answer or _OBJECT)
    if streams:
        content["application/x-ndjson"] = {
            "schema": {
                "type": "string",
                "description": "One JSON object a line (the default unless `stream` is false).",
            }
        }
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": ["Ollama"],
        "responses": {"200": {"description": "As Ollama answers.", "content": content}},
    }
    operation["responses"].update(_OLLAMA_ERRORS)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    if admin:
        operation["description"] = (
            "Admin keys only. The `x-oproxy-backend` header picks the backend; without it, "
            "the only Ollama backend, or each one the model's rule allows, in turn."
        )
        operation["parameters"] = [
            {
                "name": "x-oproxy-backend",
                "in": "header",
                "required": False,
                "schema": _STRING,
                "description": "The name of the Ollama backend to manage.",
            }
        ]
    return operation


def _ollama_paths() -> dict[str, Any]:
    """Ollama's native API, for Ollama's clients, under the same keys and limits."""
    body = _OLLAMA_BODY

    def post(summary: str, **extra: Any) -> dict[str, Any]:
        return {"post": _ollama_operation(summary, body=body, **extra)}

    return {
        "/api/chat": post("Chat (Ollama)", streams=True),
        "/api/generate": post("Generate (Ollama)", streams=True),
        "/api/embed": post("Embed (Ollama)"),
        "/api/embeddings": post("Embeddings, the legacy route (Ollama)"),
        "/api/show": post("Show a model (Ollama)"),
        "/api/tags": {
            "get": _ollama_operation("Models of every backend, and aliases", answer=_OLLAMA_MODELS)
        },
        "/api/ps": {"get": _ollama_operation("Loaded models", answer=_OLLAMA_MODELS)},
        "/api/version": {
            "get": _ollama_operation(
                "The first reachable Ollama backend's version",
                answer={"type": "object", "properties": {"version": _STRING}},
            )
        },
        "/api/pull": post("Pull a model", streams=True, admin=True),
        "/api/push": post("Push a model", streams=True, admin=True),
        "/api/create": post("Create a model", streams=True, admin=True),
        "/api/delete": {
            "delete": _ollama_operation("Delete a model", body=body, admin=True, answer={})
        },
        "/api/copy": post("Copy a model", admin=True, answer={}),
    }


# -- OpenAI's Responses API and Anthropic's Messages API ------------------------------

_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "description": "A response's id (`resp_...`); only the key that made it finds it.",
    "schema": _STRING,
}

AGENT_SCHEMAS: dict[str, Any] = {
    "ResponseRequest": _request(
        ["input"],
        {
            "input": {
                "description": (
                    "Text, or items: messages (text and image parts), `function_call`, "
                    "`function_call_output` and `reasoning` items."
                ),
                "oneOf": [_STRING, _OBJECTS],
            },
            "instructions": _STRING,
            "previous_response_id": _STRING,
            "store": {
                "type": "boolean",
                "default": True,
                "description": "Keep the response (for `responses.ttl`) for the same key.",
            },
            "stream": _BOOLEAN,
            "tools": _OBJECTS,
            "tool_choice": _STRING_OR_OBJECT,
            "parallel_tool_calls": _BOOLEAN,
            "reasoning": {
                "type": "object",
                "properties": {"effort": _MAYBE_STRING},
            },
            "text": {
                "type": "object",
                "properties": {"format": _OBJECT},
            },
            "max_output_tokens": _POSITIVE,
            "temperature": _TEMPERATURE,
            "top_p": _TOP_P,
            "metadata": {"type": "object", "additionalProperties": _STRING},
            "options": _OPTIONS,
        },
    ),
    "Response": {
        "type": "object",
        "required": ["id", "object", "created_at", "status", "model", "output"],
        "properties": {
            "id": _STRING,
            "object": {"const": "response"},
            "created_at": _INTEGER,
            "status": {"type": "string", "enum": ["completed", "incomplete", "failed"]},
            "model": _STRING,
            "output": _OBJECTS,
            "usage": {"type": ["object", "null"]},
            "store": _BOOLEAN,
            "previous_response_id": _MAYBE_STRING,
        },
    },
    "ResponseItemList": {
        "type": "object",
        "required": ["object", "data", "has_more", "first_id", "last_id"],
        "properties": {
            "object": {"const": "list"},
            "data": _OBJECTS,
            "has_more": _BOOLEAN,
            "first_id": _MAYBE_STRING,
            "last_id": _MAYBE_STRING,
        },
    },
    "DeletedResponse": {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {
            "id": _STRING,
            "object": {"const": "response"},
            "deleted": {"const": True},
        },
    },
    "MessageRequest": _request(
        ["messages", "max_tokens"],
        {
            "max_tokens": _POSITIVE,
            "system": _TEXT_OR_BLOCKS,
            "messages": {
                "type": "array",
                "minItems": 1,
                "description": (
                    "Turns of `user` and `assistant`, each text or content blocks: text, "
                    "image (base64 or url), tool_use, tool_result, thinking."
                ),
                "items": _OBJECT,
            },
            "tools": _OBJECTS,
            "tool_choice": _OBJECT,
            "stop_sequences": _STRINGS,
            "temperature": _TOP_P,
            "top_p": _TOP_P,
            "top_k": {"type": "integer", "minimum": 0},
            "thinking": _OBJECT,
            "stream": _BOOLEAN,
            "metadata": _OBJECT,
        },
    ),
    "CountTokensRequest": _request(
        ["messages"],
        {
            "system": _TEXT_OR_BLOCKS,
            "messages": {"type": "array", "minItems": 1, "items": _OBJECT},
            "tools": _OBJECTS,
        },
    ),
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        "properties": {
            "id": _STRING,
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "model": _STRING,
            "content": _OBJECTS,
            "stop_reason": {
                "type": ["string", "null"],
                "enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal", None],
            },
            "stop_sequence": _MAYBE_STRING,
            "usage": {
                "type": "object",
                "required": ["input_tokens", "output_tokens"],
                "properties": {
                    "input_tokens": _INTEGER,
                    "output_tokens": _INTEGER,
                },
            },
        },
    },
    "MessageTokensCount": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {
            "input_tokens": {
                "type": "integer",
                "description": "An estimate: text characters / 4, and a fixed share per image.",
            }
        },
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {
                        "type": "string",
                        "enum": [
                            "invalid_request_error",
                            "authentication_error",
                            "permission_error",
                            "not_found_error",
                            "rate_limit_error",
                            "api_error",
                            "timeout_error",
                            "overloaded_error",
                        ],
                    },
                    "message": _STRING,
                },
            },
        },
    },
}


def _responses_paths() -> dict[str, Any]:
    """OpenAI's Responses API, answered by any backend's chat API."""
    create = _post(
        "Create a response", "ResponseRequest", "Response", streams=True, tag="Responses"
    )
    create["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]["description"] = (
        "Server-sent events, each `event: <type>` and `data: {event}` with its "
        "`sequence_number`: response.created, response.in_progress, "
        "response.output_item.added, response.content_part.added, "
        "response.output_text.delta / .done, response.function_call_arguments.delta / .done, "
        "response.output_item.done, response.completed (or response.incomplete); "
        "error and response.failed on a failure."
    )
    page = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
        {"name": "after", "in": "query", "schema": _STRING},
    ]

    def operation(summary: str, answer: str, **extra: Any) -> dict[str, Any]:
        return {
            "summary": summary,
            "tags": ["Responses"],
            "responses": {
                "200": {"description": "OK", "content": _json(_ref(answer))},
                **_COMMON_ERRORS,
            },
            **extra,
        }

    return {
        "/v1/responses": create,
        "/v1/responses/{response_id}": {
            "parameters": [_RESPONSE_ID],
            "get": operation("Retrieve a stored response", "Response"),
            "delete": operation("Delete a stored response", "DeletedResponse"),
        },
        "/v1/responses/{response_id}/input_items": {
            "parameters": [_RESPONSE_ID],
            "get": operation(
                "List a stored response's input items", "ResponseItemList", parameters=page
            ),
        },
    }


_ANTHROPIC_ERRORS = {
    status: {"$ref": "#/components/responses/AnthropicError"}
    for status in ("400", "401", "403", "404", "413", "429", "500", "504", "529")
}


def _messages_paths() -> dict[str, Any]:
    """Anthropic's Messages API, answered by any backend's chat API, in its own errors."""
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"x-api-key": []}]
    headers = [
        {
            "name": "anthropic-version",
            "in": "header",
            "required": False,
            "schema": _STRING,
            "description": "Accepted and not needed: the API served is the one oproxy knows.",
        }
    ]
    stream = {
        "type": "string",
        "description": (
            "Server-sent events, each `event: <type>` and `data: {event}`: message_start, "
            "ping, content_block_start / _delta (text_delta, input_json_delta, "
            "thinking_delta) / _stop, message_delta (stop_reason, usage), message_stop; "
            "error on a failure."
        ),
    }
    return {
        "/v1/messages": {
            "post": {
                "summary": "Create a message",
                "tags": ["Anthropic"],
                "security": security,
                "parameters": headers,
                "requestBody": {"required": True, "content": _json(_ref("MessageRequest"))},
                "responses": {
                    "200": {
                        "description": "The message, or its stream.",
                        "content": {
                            **_json(_ref("Message")),
                            "text/event-stream": {"schema": stream},
                        },
                    },
                    **_ANTHROPIC_ERRORS,
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "summary": "Estimate a message's input tokens",
                "description": (
                    "An estimate from the proxy's own rule (text characters / 4, a fixed share "
                    "per image), not a tokenizer's count; no backend is asked."
                ),
                "tags": ["Anthropic"],
                "security": security,
                "parameters": headers,
                "requestBody": {"required": True, "content": _json(_ref("CountTokensRequest"))},
                "responses": {
                    "200": {"description": "OK", "content": _json(_ref("MessageTokensCount"))},
                    **_ANTHROPIC_ERRORS,
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """The whole document (OpenAPI 3.1)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "oproxy",
            "version": __version__,
            "description": "An OpenAI-compatible gateway in front of Ollama and other servers.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": _post(
                "Create a chat completion",
                "ChatCompletionRequest",
                "ChatCompletion",
                streams=True,
                tag="OpenAI",
            ),
            "/v1/completions": _post(
                "Create a text completion",
                "CompletionRequest",
                "Completion",
                streams=True,
                tag="OpenAI",
            ),
            "/v1/embeddings": _post(
                "Create embeddings",
                "EmbeddingRequest",
                "EmbeddingList",
                streams=False,
                tag="OpenAI",
            ),
            "/v1/models": _get("List models", _ref("ModelList"), tag="OpenAI"),
            "/v1/models/{model}": {
                **_get("Retrieve a model", _ref("Model"), tag="OpenAI"),
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "description": "A model id; `/` may be sent raw or as `%2F`.",
                        "schema": _STRING,
                    }
                ],
            },
            "/v1/health": _get(
                "Health of the proxy and every backend", _ref("Health"), tag="Operations"
            ),
            "/healthz": _get("Liveness", _ref("Status"), tag="Operations", secured=False),
            "/readyz": _get("Readiness", _ref("Status"), tag="Operations", secured=False),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics over every worker",
                    "tags": ["Operations"],
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {"text/plain": {"schema": _STRING}},
                        },
                        "401": _ERROR,
                    },
                }
            },
            "/openapi.json": _get("This document", _OBJECT, tag="Operations", secured=False),
            **_responses_paths(),
            **_messages_paths(),
            **_admin_paths(),
            **_model_loading_paths(),
            **_ollama_paths(),
            **_console_paths(),
        },
        "components": {
            "schemas": {**SCHEMAS, **AGENT_SCHEMAS},
            "responses": {
                "Error": {
                    "description": "An OpenAI error object.",
                    "content": _json(_ref("Error")),
                },
                "AnthropicError": {
                    "description": "An Anthropic error object.",
                    "content": _json(_ref("AnthropicError")),
                },
                "OllamaError": {
                    "description": 'An Ollama error: `{"error": "..."}`.',
                    "content": _json(
                        {
                            "type": "object",
                            "required": ["error"],
                            "properties": {"error": _STRING},
                        }
                    ),
                },
            },
            "securitySchemes": {
                "consoleSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "oproxy_console",
                    "description": "The console's session, from signing in with an admin key.",
                },
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key, when the server has keys configured.",
                },
                "x-api-key": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The same key, as Anthropic's clients send it (Messages only).",
                },
            },
        },
    }
