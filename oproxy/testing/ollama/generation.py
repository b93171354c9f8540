"""
Deterministic "inference" for the fake Ollama: every answer, thought, tool
call and log-probability is a pure function of the model and the request,
so tests can assert exact content instead of "something came back".

The shapes follow what real models produce through Ollama (word-sized
tokens with their leading space, thinking before content, a tool call with
object arguments), but the words are fixed and documented here:

* answer: ``You said: <first 8 words of the last user message, trailing
  .!?,;: removed>. This is a fake answer from <model>.`` (``Hello! This is a
  fake answer from <model>.`` when there are no words), prefixed for vision
  models by ``I see N image(s) (S bytes, ...).`` / ``I see no images.``;
* after a ``tool`` message: ``The tool returned: <its content>``;
* ``format: "json"``: ``{"answer": "<answer>"}``; a schema: an instance of
  it (see :func:`~oproxy.testing.base.answers.schema_instance`).

Embeddings are :mod:`oproxy.testing.base.answers`' vectors.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from oproxy.testing.base.answers import excerpt, schema_instance, tokenize
from oproxy.testing.ollama.models import FakeModel
from oproxy.testing.ollama.wire import go_quote

_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


# --------------------------------------------------------------------------
# Text


def _vision_prefix(images: Sequence[bytes]) -> str:
    if not images:
        return "I see no images. "
    noun = "image" if len(images) == 1 else "images"
    sizes = ", ".join(f"{len(image)} bytes" for image in images)
    return f"I see {len(images)} {noun} ({sizes}). "


def answer_text(
    model: FakeModel,
    said: str,
    *,
    images: Sequence[bytes] = (),
    suffix: str = "",
    tool_result: str | None = None,
) -> str:
    """
    The fake's answer to ``said`` (the last user message, or the prompt).
    """
    if tool_result is not None:
        return f"The tool returned: {tool_result}"
    prefix = _vision_prefix(images) if model.has("vision") else ""
    words = excerpt(said)
    body = f"You said: {words}." if words else "Hello!"
    if excerpt(suffix):
        body += f" The middle goes before: {excerpt(suffix)}."
    return f"{prefix}{body} This is a fake answer from {model.short}."


def thinking_text(said: str, tool_result: str | None = None) -> str:
    """
    What a thinking model "thinks" before answering.
    """
    if tool_result is not None:
        return "The tool answered. I should pass the result on."
    words = excerpt(said)
    if not words:
        return "There is no question. I should greet the user."
    return f"The user wrote: {words}. I should answer briefly."


def _padded(tokens: list[str], length: int) -> list[str]:
    filler = (f" token{index}" for index in range(len(tokens), length))
    return (tokens + list(filler))[:length]


# --------------------------------------------------------------------------
# Tool calls


def _stable_id(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return "".join(_ID_ALPHABET[byte % len(_ID_ALPHABET)] for byte in digest[:8])


def tool_call(tool: Any, seed: str) -> dict[str, Any]:
    """
    The call the fake makes to ``tool``: arguments built from its parameters
    schema by :func:`schema_instance`, and an id ``call_`` + 8 characters of
    ``[a-z0-9]`` that is stable for a given request.
    """
    function = tool.get("function") if isinstance(tool, Mapping) else None
    function = function if isinstance(function, Mapping) else {}
    name = function.get("name")
    name = name if isinstance(name, str) else ""
    params = function.get("parameters")
    arguments = schema_instance(params if isinstance(params, Mapping) else {"type": "object"})
    if not isinstance(arguments, dict):
        arguments = {}
    call_id = "call_" + _stable_id(name, json.dumps(arguments), seed)
    return {"id": call_id, "function": {"index": 0, "name": name, "arguments": arguments}}


# --------------------------------------------------------------------------
# Log-probabilities


def _logprob(token: str) -> float:
    return -round((zlib.crc32(token.encode()) % 1000 + 1) / 2000, 4)


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprob_entry(token: str, top: int) -> dict[str, Any]:
    """
    A ``logprobs`` entry for ``token``: the token itself with a stable
    logprob, and ``top`` alternatives (the token first, then ``" alt1"``,
    ``" alt2"``... with lower logprobs); ``top_logprobs`` is omitted for 0,
    as Go's ``omitempty`` does.
    """
    logprob = _logprob(token)
    entry = _token_logprob(token, logprob)
    if top > 0:
        alternatives = [_token_logprob(token, logprob)]
        alternatives += [
            _token_logprob(f" alt{k}", round(logprob - 0.75 * k, 4)) for k in range(1, top)
        ]
        entry["top_logprobs"] = alternatives
    return entry


# --------------------------------------------------------------------------
# Options


_OPTION_KINDS: Final = {
    "num_ctx": "integer",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "num_thread": "integer",
    "use_mmap": "boolean",
    "num_keep": "integer",
    "seed": "integer",
    "num_predict": "integer",
    "top_k": "integer",
    "repeat_last_n": "integer",
    "draft_num_predict": "integer",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "stop": "array",
}


@dataclass(frozen=True)
class Options:
    """
    The runtime options the fake honours; everything else is accepted and
    ignored, as Ollama does with options that do not change its output.
    """

    num_predict: int = -1
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None
    seed: int | None = None


def _option_error(key: str, kind: str, value: Any) -> str | None:
    if kind in ("integer", "float32"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    else:
        if not isinstance(value, list):
            return f"option {go_quote(key)} must be of type array"
        if not all(isinstance(item, str) for item in value):
            return f"option {go_quote(key)} must be of an array of strings"
        ok = True
    return None if ok else f"option {go_quote(key)} must be of type {kind}"


def parse_options(options: Mapping[str, Any] | None) -> Options | str:
    """
    Validate ``options`` like Ollama's ``Options.FromMap`` and extract what
    the fake uses; returns Go's error message (a 500 on the real server,
    e.g. ``option "stop" must be of type array``) instead on a bad type.
    Unknown keys and ``null`` values are ignored.
    """
    values: dict[str, Any] = {}
    for key, value in (options or {}).items():
        kind = _OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        error = _option_error(key, kind, value)
        if error is not None:
            return error
        values[key] = value
    return Options(
        num_predict=int(values.get("num_predict", -1)),
        stop=tuple(values.get("stop", ())),
        num_ctx=int(values["num_ctx"]) if "num_ctx" in values else None,
        seed=int(values["seed"]) if "seed" in values else None,
    )


# --------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Piece:
    """
    One streamed chunk's worth of output and the tokens it accounts for.
    """

    content: str = ""
    thinking: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    logprobs: tuple[dict[str, Any], ...] = ()
    tokens: int = 1


@dataclass(frozen=True)
class Plan:
    """
    Everything a generation will emit, decided before the first byte.

    :ivar error: when set, the stream ends with ``{"error": error}`` after
        the pieces instead of a ``done`` line.
    """

    pieces: tuple[Piece, ...]
    done_reason: str = "stop"
    error: str | None = None
    stall: bool = False
    prompt_tokens: int = 1

    @property
    def eval_count(self) -> int:
        """
        Tokens generated (thinking, content and tool-call tokens).
        """
        return sum(piece.tokens for piece in self.pieces)


@dataclass(frozen=True)
class GenerationInput:
    """
    The parts of a chat or generate request that decide the output.

    :ivar said: the last user message (chat) or the prompt (generate).
    :ivar tool_result: the content of the last message when it is a
        ``tool`` message.
    """

    model: FakeModel
    said: str
    prompt_tokens: int
    options: Options
    images: tuple[bytes, ...] = ()
    suffix: str = ""
    tool_result: str | None = None
    tools: tuple[Any, ...] = ()
    think: bool = False
    format: Any = None
    logprobs: bool = False
    top_logprobs: int = 0
    seed_text: str = field(default="", compare=False)


def _apply_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(stop) for stop in stops if stop and stop in text), default=-1)
    return text if cut < 0 else text[:cut]


def _content_text(inp: GenerationInput) -> str:
    text = answer_text(
        inp.model, inp.said, images=inp.images, suffix=inp.suffix, tool_result=inp.tool_result
    )
    if inp.format == "json":
        return json.dumps({"answer": text}, ensure_ascii=False)
    if isinstance(inp.format, Mapping):
        return json.dumps(schema_instance(inp.format), ensure_ascii=False)
    return text


def _text_pieces(tokens: Sequence[str], kind: str, inp: GenerationInput) -> list[Piece]:
    def logprobs(token: str) -> tuple[dict[str, Any], ...]:
        return (logprob_entry(token, inp.top_logprobs),) if inp.logprobs else ()

    if kind == "thinking":
        return [Piece(thinking=token, logprobs=logprobs(token)) for token in tokens]
    return [Piece(content=token, logprobs=logprobs(token)) for token in tokens]


def build_plan(inp: GenerationInput) -> Plan:
    """
    Decide the whole output of a generation: thinking first (when on), then
    either a call to the first tool or the answer, cut by ``stop``
    sequences and ``num_predict`` (which gives ``done_reason: "length"``).
    """
    model = inp.model
    thinking = tokenize(thinking_text(inp.said, inp.tool_result)) if inp.think else []
    pieces = _text_pieces(thinking, "thinking", inp)
    if inp.tools and inp.tool_result is None:
        call = tool_call(inp.tools[0], inp.seed_text)
        call_tokens = len(tokenize(json.dumps(call["function"])))
        pieces.append(Piece(tool_calls=(call,), tokens=call_tokens))
        return Plan(tuple(pieces), prompt_tokens=inp.prompt_tokens)
    content = tokenize(_apply_stop(_content_text(inp), inp.options.stop))
    if model.answer_tokens > 0:
        content = _padded(content, model.answer_tokens)
    if model.midstream_error is not None:
        content = content[: model.tokens_before_error]
    pieces += _text_pieces(content, "content", inp)
    done_reason = "stop"
    limit = inp.options.num_predict
    if limit > 0 and len(pieces) >= limit:
        pieces, done_reason = pieces[:limit], "length"
    return Plan(
        tuple(pieces),
        done_reason=done_reason,
        error=model.midstream_error,
        stall=model.stall,
        prompt_tokens=inp.prompt_tokens,
    )


def context_ids(previous: Sequence[int], *texts: str) -> list[int]:
    """
    The ``context`` array of ``/api/generate``: the previous context plus a
    stable id per word token of ``texts``.
    """
    ids = list(previous)
    for text in texts:
        ids += [100 + zlib.crc32(token.encode()) % 128000 for token in tokenize(text)]
    return ids
