"""
``/v1/completions`` (legacy) ⇄ Ollama ``/api/generate``.

Each prompt of a list, and each of ``n`` choices, is one native call: the
HTTP layer (:mod:`oproxy.api.choices`) splits the request, the Ollama
adapter builds each call's choice with :func:`ollama_generate_to_choice`
(or a :class:`CompletionStreamTranslator`), and the HTTP layer joins them.

Better than Ollama's /v1: prompt lists work, ``echo`` works, requested
``logprobs`` are returned, and stream chunks carry no zero ``usage``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from oproxy.translate.common import (
    StreamTranslation,
    envelope,
    generation_options,
    invalid_value,
    native_format,
    native_think,
    optional_boolean,
    optional_integer,
    optional_string,
    raise_for_upstream_error,
    require_object_body,
    set_given,
    text_inputs,
    usage_from_ollama,
    wants_stream,
    wants_usage_chunk,
)

_MAX_LOGPROBS = 20
"""Ollama's ``top_logprobs`` limit (OpenAI's is 5; more does no harm)."""

#: Why a prompt of token ids is refused, and what to send instead.
_TEXT_PROMPTS_ONLY: Final = (
    "Token prompts (arrays of integers) are not supported by this server: "
    "send the prompt as a string or a list of strings."
)


# ==========================================================================
# Request


def completion_prompts(body: Mapping[str, Any]) -> list[str]:
    """
    The prompts of a completions request: one string, or a non-empty list.

    Ollama has no endpoint that takes tokens, so token arrays are refused
    with a message that says so, rather than Ollama's Go decode error.
    """
    return text_inputs(body, "prompt", tokens_refused=_TEXT_PROMPTS_ONLY)


def single_prompt(body: Mapping[str, Any]) -> str:
    """
    The one prompt of a request for one generation (a string, or a list of
    one): the HTTP layer splits longer lists, each prompt its own call.
    """
    prompts = completion_prompts(body)
    if len(prompts) != 1:
        raise invalid_value("prompt", "Invalid 'prompt': expected one prompt for one generation.")
    return prompts[0]


def echo_requested(body: Mapping[str, Any]) -> bool:
    """Whether the prompt is to be echoed before the completion."""
    return optional_boolean(body, "echo", "echo") is True


def requested_logprobs(body: Mapping[str, Any]) -> int | None:
    """
    ``logprobs``: how many alternatives per token, or None for no logprobs.

    In this API ``logprobs`` is an integer, and only a positive one asks for
    log probabilities (``0`` and ``null`` do not), so ``True`` is refused
    rather than read as 1.
    """
    count = optional_integer(body, "logprobs", "logprobs", minimum=0, maximum=_MAX_LOGPROBS)
    return count if count else None


def completion_request_to_ollama(
    body: Mapping[str, Any], *, model: str, prompt: str
) -> dict[str, Any]:
    """
    The native ``/api/generate`` body for one prompt of a completions request.

    ``raw`` is sent as false so the model's template still applies, as with
    Ollama's /v1.  ``suffix`` enables fill-in-the-middle on models that
    support it.  ``n`` and ``best_of`` are checked but not sent: Ollama
    makes one choice a call, and the HTTP layer (:mod:`oproxy.api.choices`)
    makes one call per prompt and choice.

    :raises InvalidRequest: naming the first bad field.
    """
    body = require_object_body(body)
    optional_integer(body, "n", "n", minimum=1)
    optional_integer(body, "best_of", "best_of", minimum=1)
    echo_requested(body)
    wants_usage_chunk(body)
    native: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "stream": wants_stream(body),
        "raw": False,
    }
    suffix = optional_string(body, "suffix", "suffix")
    if suffix:
        native["suffix"] = suffix
    options, top_level = generation_options(body)
    if options:
        native["options"] = options
    set_given(native, "format", native_format(body))
    set_given(native, "think", native_think(body))
    logprobs = requested_logprobs(body)
    if logprobs is not None:
        native["logprobs"] = True
        native["top_logprobs"] = logprobs
    native.update(top_level)
    return native


# ==========================================================================
# Response


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if value != value else value  # NaN is not a log probability


def _alternatives(entry: Mapping[str, Any]) -> dict[str, float | int]:
    """A token's alternatives as OpenAI's legacy ``{token: logprob}`` map."""
    alternatives: dict[str, float | int] = {}
    top = entry.get("top_logprobs")
    for item in top if isinstance(top, list) else ():
        if not isinstance(item, Mapping):
            continue
        token, logprob = item.get("token"), _number(item.get("logprob"))
        if isinstance(token, str) and logprob is not None:
            alternatives[token] = logprob
    return alternatives


def completion_logprobs(native_logprobs: object, *, offset: int) -> dict[str, Any]:
    """
    Native logprobs as the legacy ``{tokens, token_logprobs, top_logprobs,
    text_offset}`` object; offsets count characters from ``offset`` (the
    length of the text before these tokens, including an echoed prompt).
    """
    result: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for entry in native_logprobs if isinstance(native_logprobs, list) else ():
        if not isinstance(entry, Mapping):
            continue
        token, logprob = entry.get("token"), _number(entry.get("logprob"))
        if not isinstance(token, str) or logprob is None:
            continue
        result["tokens"].append(token)
        result["token_logprobs"].append(logprob)
        result["top_logprobs"].append(_alternatives(entry))
        result["text_offset"].append(offset)
        offset += len(token)
    return result


def completion_finish_reason(done_reason: object) -> str:
    """``length`` when the token limit cut the text, else ``stop``."""
    return "length" if done_reason == "length" else "stop"


def ollama_generate_to_choice(
    native: Mapping[str, Any],
    *,
    index: int,
    echo_prompt: str | None,
    logprobs_requested: bool,
) -> dict[str, Any]:
    """
    One completions choice from a non-streamed native generate response.

    :param echo_prompt: the prompt to put before the text (``echo``), or None.
    :raises UpstreamError: if ``native`` is an ``{"error": ...}`` object.
    """
    raise_for_upstream_error(native)
    prefix = echo_prompt or ""
    return {
        "text": prefix + _text(native.get("response")),
        "index": index,
        "logprobs": (
            completion_logprobs(native.get("logprobs"), offset=len(prefix))
            if logprobs_requested
            else None
        ),
        "finish_reason": completion_finish_reason(native.get("done_reason")),
    }


def completion_response(
    choices: list[dict[str, Any]],
    *,
    completion_id: str,
    model: str,
    created: int,
    usage: Mapping[str, int],
) -> dict[str, Any]:
    """A ``text_completion`` object around the choices of every prompt."""
    return {
        **envelope("text_completion", completion_id=completion_id, model=model, created=created),
        "choices": choices,
        "usage": dict(usage),
    }


def completion_usage_chunk(
    *, completion_id: str, model: str, created: int, usage: Mapping[str, int]
) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the usage."""
    return completion_response(
        [], completion_id=completion_id, model=model, created=created, usage=usage
    )


class CompletionStreamTranslator(StreamTranslation):
    """
    Native ``/api/generate`` NDJSON lines in, ``text_completion`` chunks out,
    for the prompt at ``index``.

    Chunks say ``finish_reason: null`` until the done line.  With ``echo``
    the prompt is sent first, as its own chunk.  Chunks carry no ``usage``
    key (Ollama's /v1 sends zero counts on each, which clients may add up);
    with ``include_usage`` the usage comes last, from
    :func:`completion_usage_chunk`, once every prompt is done.
    """

    def __init__(
        self,
        completion_id: str,
        model: str,
        created: int,
        *,
        index: int,
        echo_prompt: str | None,
        logprobs_requested: bool,
    ) -> None:
        super().__init__(
            "text_completion", completion_id=completion_id, model=model, created=created
        )
        self._index = index
        self._pending_echo = echo_prompt or ""
        self._logprobs_requested = logprobs_requested
        self._offset = 0

    def feed(self, native_line: Mapping[str, Any]) -> list[dict[str, Any]]:
        raise_for_upstream_error(native_line)
        if self.done:
            return []
        chunks = []
        if self._pending_echo:
            chunks.append(self._chunk(self._pending_echo, None, None))
            self._pending_echo = ""
        text = _text(native_line.get("response"))
        logprobs = self._logprobs(native_line.get("logprobs"))
        finished = native_line.get("done") is True
        if finished:
            self.done = True
            self.usage = usage_from_ollama(native_line)
            reason = completion_finish_reason(native_line.get("done_reason"))
            chunks.append(self._chunk(text, logprobs, reason))
        elif text or (logprobs and logprobs["tokens"]):
            chunks.append(self._chunk(text, logprobs, None))
        return chunks

    def _logprobs(self, native_logprobs: object) -> dict[str, Any] | None:
        if not self._logprobs_requested:
            return None
        return completion_logprobs(native_logprobs, offset=self._offset)

    def _chunk(
        self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        self._text_parts.append(text)
        self._offset += len(text)
        choice = {
            "text": text,
            "index": self._index,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return {**self._envelope, "choices": [choice]}
