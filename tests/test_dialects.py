"""
The two error dialects: what an OpenAI client and an Ollama client read
when something goes wrong, whole or in the middle of a stream.
"""

from __future__ import annotations

import anthropic
import anthropic.types
import httpx
import orjson
import pytest
from twisted.web.test.requesthelper import DummyRequest

from oproxy.errors import (
    AnsweredBusy,
    AnsweredRefusal,
    BackendsDown,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    OProxyError,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    ServerError,
    Unauthorized,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from oproxy.web.dialects import ANTHROPIC, OLLAMA, OPENAI, Dialect, dialect_for_path
from tests.openai_schema import assert_valid


def respond(dialect: Dialect, error: OProxyError) -> tuple[DummyRequest, bytes]:
    request = DummyRequest([b""])
    return request, dialect.respond(request, error)


def test_openai_errors_are_the_error_object_with_every_key() -> None:
    error = InvalidRequest("messages must be a list", param="messages", code="invalid_type")
    request, body = respond(OPENAI, error)
    assert request.responseCode == 400
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert orjson.loads(body) == {
        "error": {
            "message": "messages must be a list",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "invalid_type",
        }
    }
    assert_valid("ErrorResponse", orjson.loads(body))


def test_an_errors_headers_go_out_with_it_in_either_dialect() -> None:
    error = BackendsDown("llama3.2", ["gpu-1"], retry_after=2.5)
    for dialect in (OPENAI, OLLAMA):
        request, _ = respond(dialect, error)
        assert request.responseCode == 503
        assert request.responseHeaders.getRawHeaders(b"retry-after") == [b"3"]


def test_ollama_errors_are_one_message() -> None:
    request, body = respond(OLLAMA, RequestTooLarge("Request body is too large."))
    assert request.responseCode == 413
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json; charset=utf-8"
    ]
    assert orjson.loads(body) == {"error": "Request body is too large."}


def test_ollama_clients_read_a_backends_answer_as_ollama_gave_it() -> None:
    refused = AnsweredRefusal(400, "invalid options", "gpu-1")
    busy = AnsweredBusy(503, "server busy, please try again", "gpu-1")
    assert OLLAMA.status_and_body(refused) == (400, b'{"error":"invalid options"}')
    assert OLLAMA.status_and_body(busy) == (503, b'{"error":"server busy, please try again"}')
    # An OpenAI client is told which backend said so.
    status, body = OPENAI.status_and_body(busy)
    assert status == 503
    assert "gpu-1" in orjson.loads(body)["error"]["message"]


def test_a_missing_model_is_said_the_way_ollama_says_it() -> None:
    status, body = OLLAMA.status_and_body(ModelNotFound("llama9"))
    assert (status, orjson.loads(body)) == (404, {"error": "model 'llama9' not found"})


def test_a_failure_after_a_stream_began_is_its_last_event() -> None:
    error = ServerError()
    event = OPENAI.stream_event(error)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[len(b"data: ") :]) == error.to_body()
    line = OLLAMA.stream_event(AnsweredRefusal(400, "bad", "b"))
    assert line == b'{"error":"bad"}\n'


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        (b"/api/chat", OLLAMA),
        (b"api/generate", OLLAMA),
        (b"/api/tags?x=1", OLLAMA),
        (b"/v1/chat/completions", OPENAI),
        (b"/v1/messages", ANTHROPIC),
        (b"/v1/messages/count_tokens", ANTHROPIC),
        (b"/v1/messages?beta=true", ANTHROPIC),
        (b"/v1/messagesx", OPENAI),
        (b"/apix", OPENAI),
        (b"", OPENAI),
    ],
)
def test_before_routing_the_path_picks_the_dialect(path: bytes, dialect: Dialect) -> None:
    assert dialect_for_path(path) is dialect


@pytest.mark.parametrize(
    ("error", "status", "kind", "sdk_error"),
    [
        (
            InvalidRequest("bad", param="messages"),
            400,
            "invalid_request_error",
            anthropic.BadRequestError,
        ),
        (Unauthorized("no key"), 401, "authentication_error", anthropic.AuthenticationError),
        (PermissionDenied("not yours"), 403, "permission_error", anthropic.PermissionDeniedError),
        (ModelNotFound("llama9"), 404, "not_found_error", anthropic.NotFoundError),
        (RequestTooLarge("too big"), 413, "invalid_request_error", anthropic.APIStatusError),
        (RateLimited("slow down"), 429, "rate_limit_error", anthropic.RateLimitError),
        (QuotaExceeded("used up"), 429, "rate_limit_error", anthropic.RateLimitError),
        (ServerError(), 500, "api_error", anthropic.InternalServerError),
        (UpstreamError("backend failed"), 500, "api_error", anthropic.InternalServerError),
        (UpstreamUnavailable("unreachable"), 500, "api_error", anthropic.InternalServerError),
        (UpstreamBusy("busy"), 529, "overloaded_error", anthropic.InternalServerError),
        (BackendsDown("m", ["b"], 1.0), 529, "overloaded_error", anthropic.InternalServerError),
        (UpstreamTimeout("slow"), 504, "timeout_error", anthropic.InternalServerError),
        (MethodNotAllowed("no"), 405, "invalid_request_error", anthropic.APIStatusError),
    ],
)
def test_anthropic_errors_are_what_its_sdk_reads(
    error: OProxyError, status: int, kind: str, sdk_error: type[Exception]
) -> None:
    request = DummyRequest([b""])
    request.oproxy_request_id = "req_1"  # type: ignore[attr-defined]
    body = ANTHROPIC.respond(request, error)
    assert request.responseCode == status
    assert request.responseHeaders.getRawHeaders(b"request-id") == [b"req_1"]
    parsed = anthropic.types.ErrorResponse.model_validate_json(body)
    assert (parsed.type, parsed.error.type, parsed.error.message) == ("error", kind, error.message)
    # The SDK raises its class for the status (529: its OverloadedError).
    response = httpx.Response(status, content=body, request=httpx.Request("POST", "http://x/"))
    client = anthropic.Anthropic(api_key="k", base_url="http://x")
    raised = client._make_status_error_from_response(response)  # type: ignore[arg-type]
    assert isinstance(raised, sdk_error) and raised.status_code == status
    if status == 529:
        assert type(raised).__name__ == "OverloadedError"


def test_an_anthropic_stream_ends_with_an_error_event() -> None:
    event = ANTHROPIC.stream_event(UpstreamBusy("busy"))
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert orjson.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "busy"},
    }
