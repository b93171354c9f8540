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


_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "description": "Text, or a list of text and image_url parts; null for tool-call turns.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object"}},
                {"type": "null"},
            ],
        },
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
        "name": {"type": "string"},
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
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
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
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _MESSAGE},
            "stream": {"type": "boolean"},
            "stream_options": {"type": "object"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "seed": {"type": "integer"},
            "n": _CHOICES,
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "frequency_penalty": {"type": "number"},
            "presence_penalty": {"type": "number"},
            "tools": {"type": "array", "items": {"type": "object"}},
            "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
            "response_format": {"type": "object"},
            "reasoning_effort": {"type": "string"},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "options": _OPTIONS,
            "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": _USAGE,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "prompt": {
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
            },
            "suffix": {"type": "string"},
            "echo": {"type": "boolean"},
            "stream": {"type": "boolean"},
            "n": _CHOICES,
            "best_of": {"type": "integer", "minimum": 1, "description": "Must equal n."},
            "max_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "logprobs": {"type": "integer", "minimum": 0},
            "options": _OPTIONS,
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": _USAGE,
        },
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
            },
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "minimum": 1},
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object"}},
            "model": {"type": "string"},
            "usage": _USAGE,
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
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
            "version": {"type": "string"},
            "uptime_seconds": {"type": "number"},
            "workers": {"type": "integer"},
            "backends": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
    "Key": {
        "type": "object",
        "required": ["id", "name", "status", "created", "policy"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
            "created": {"type": "string", "format": "date-time"},
            "revoked": {"type": ["string", "null"], "format": "date-time"},
            "policy": {"type": "object"},
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
            "name": {"type": "string", "minLength": 1},
            "models": {"type": "array", "items": {"type": "string"}},
            "networks": {"type": "array", "items": {"type": "string"}},
            "expires": {"type": ["number", "string"]},
            "limits": {
                "type": "object",
                "properties": {
                    name: {"type": "integer", "minimum": 1}
                    for name in ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")
                },
                "additionalProperties": False,
            },
            "model_limits": {"type": "object"},
            "admin": {"type": "boolean"},
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
        "schema": {"type": "string"},
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
            "model": {"type": "string"},
            "backends": {"type": "array", "items": {"type": "string"}},
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
    "properties": {"models": {"type": "array", "items": {"type": "object"}}},
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
    content: dict[str, Any] = _json(answer or {"type": "object"})
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
                "schema": {"type": "string"},
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
                answer={"type": "object", "properties": {"version": {"type": "string"}}},
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
                        "schema": {"type": "string"},
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
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _ERROR,
                    },
                }
            },
            "/openapi.json": _get(
                "This document", {"type": "object"}, tag="Operations", secured=False
            ),
            **_admin_paths(),
            **_model_loading_paths(),
            **_ollama_paths(),
        },
        "components": {
            "schemas": SCHEMAS,
            "responses": {
                "Error": {
                    "description": "An OpenAI error object.",
                    "content": _json(_ref("Error")),
                },
                "OllamaError": {
                    "description": 'An Ollama error: `{"error": "..."}`.',
                    "content": _json(
                        {
                            "type": "object",
                            "required": ["error"],
                            "properties": {"error": {"type": "string"}},
                        }
                    ),
                },
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key, when the server has keys configured.",
                }
            },
        },
    }
