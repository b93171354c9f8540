"""
What the fake OpenAI server says: deterministic answers and the exact
objects OpenAI puts on the wire for them, without any I/O.

Answers follow the fake Ollama's words (see
:mod:`oproxy.testing.base.answers`), so a test can assert exact content:

* chat: ``You said: <first 8 words of the last user message>. This is a
  fake answer from <model>.``, or after a ``tool`` message ``The tool
  returned: <its content>``; with ``tools`` (and ``tool_choice`` not
  ``none``) a call to the first (or the named) tool, arguments built from
  its parameters schema;
* completions: the same sentence about the prompt;
* embeddings: the fake Ollama's unit vectors, ``float`` or ``base64``
  (little-endian float32).

Tokens are words with their leading space; prompt tokens are counted in
words.  ``max_tokens`` / ``max_completion_tokens`` cut the answer, with
``finish_reason: "length"``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from oproxy.testing.base.answers import (
    count_words,
    embed_vector,
    excerpt,
    schema_instance,
    tokenize,
)

SYSTEM_FINGERPRINT: Final = "fp_fake"

#: Characters per fragment of streamed tool-call arguments.
ARGUMENT_FRAGMENT: Final = 8


# --------------------------------------------------------------------------
# Text


def text_of(content: object) -> str:
    """
    The text of a message ``content``: a string, or the ``text`` parts of a
    list of content parts.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def answer_sentence(model: str, said: str) -> str:
    """The fake's answer to ``said`` (a user message or a prompt)."""
    words = excerpt(said)
    body = f"You said: {words}." if words else "Hello!"
    return f"{body} This is a fake answer from {model}."


def token_limit(body: Mapping[str, Any], default: int | None = None) -> int | None:
    """``max_completion_tokens``, else ``max_tokens``, else ``default``."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def stable_id(prefix: str, *parts: str, length: int = 24) -> str:
    """An id that is the same for the same request: ``prefix`` + hex."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return prefix + digest[:length]


# --------------------------------------------------------------------------
# Plans: what one choice will say


@dataclass(frozen=True)
class ToolCall:
    """The one call a choice makes: id, function name, JSON arguments."""

    id: str
    name: str
    arguments: str

    def fragments(self) -> list[str]:
        """The arguments as streamed, in pieces to concatenate."""
        text = self.arguments
        return [text[i : i + ARGUMENT_FRAGMENT] for i in range(0, len(text), ARGUMENT_FRAGMENT)]

    def whole(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Plan:
    """
    What a request will produce: each choice's pieces (content tokens, or
    argument fragments for a tool call) and how it ends.
    """

    prompt_tokens: int
    pieces: tuple[str, ...]
    finish_reason: str
    choices: int = 1
    tool_call: ToolCall | None = None
    echo: str = ""

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces) * self.choices

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _chosen_tool(tools: object, tool_choice: object) -> Mapping[str, Any] | None:
    """The tool a request makes the model call: the named one, else the first."""
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    functions = [
        t for t in tools if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
    ]
    if isinstance(tool_choice, Mapping):
        named = tool_choice.get("function")
        wanted = named.get("name") if isinstance(named, Mapping) else None
        functions = [f for f in functions if f["function"].get("name") == wanted]
    return functions[0] if functions else None


def _tool_call(tool: Mapping[str, Any], seed: str) -> ToolCall:
    function = tool["function"]
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    parameters = function.get("parameters")
    arguments = schema_instance(parameters if isinstance(parameters, Mapping) else {})
    if not isinstance(arguments, dict):
        arguments = {}
    text = json.dumps(arguments, separators=(",", ":"))
    return ToolCall(id=stable_id("call_", name, text, seed), name=name, arguments=text)


def _cut(tokens: list[str], limit: int | None, length: int) -> tuple[tuple[str, ...], bool]:
    """``tokens`` padded to ``length`` (`` token12`` ...), then cut at ``limit``."""
    tokens = tokens + [f" token{i}" for i in range(len(tokens), length)]
    if limit is not None and len(tokens) > limit:
        return tuple(tokens[:limit]), True
    return tuple(tokens), False


def chat_plan(model: str, body: Mapping[str, Any], length: int = 0) -> Plan:
    """
    What a (validated) chat request will answer, padded to ``length``
    tokens (a slow model's long answer).
    """
    messages = [m for m in body["messages"] if isinstance(m, Mapping)]
    texts = [text_of(m.get("content")) for m in messages]
    users = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    said = users[-1] if users else ""
    last = messages[-1]
    choices = body.get("n") or 1
    limit = token_limit(body)
    tool = (
        None
        if last.get("role") == "tool"
        else _chosen_tool(body.get("tools"), body.get("tool_choice"))
    )
    if tool is not None:
        call = _tool_call(tool, f"{len(messages)}:{said}")
        return Plan(count_words(*texts), tuple(call.fragments()), "tool_calls", choices, call)
    if last.get("role") == "tool":
        sentence = f"The tool returned: {text_of(last.get('content'))}"
    else:
        sentence = answer_sentence(model, said)
    pieces, cut = _cut(tokenize(sentence), limit, length)
    return Plan(count_words(*texts), pieces, "length" if cut else "stop", choices)


def completion_plans(model: str, body: Mapping[str, Any], length: int = 0) -> list[Plan]:
    """One plan per prompt of a (validated) completions request."""
    prompt = body.get("prompt")
    prompts: list[Any] = (
        prompt if isinstance(prompt, list) and prompt and not _is_tokens(prompt) else [prompt]
    )
    limit = token_limit(body, default=16)
    plans = []
    for one in prompts:
        text = one if isinstance(one, str) else " ".join(str(t) for t in one or [])
        pieces, cut = _cut(tokenize(answer_sentence(model, text)), limit, length)
        echo = text if body.get("echo") is True else ""
        finish = "length" if cut else "stop"
        plans.append(Plan(count_words(text), pieces, finish, body.get("n") or 1, echo=echo))
    return plans


def _is_tokens(value: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


# --------------------------------------------------------------------------
# Chat objects


@dataclass(frozen=True)
class Head:
    """What every object of one answer shares."""

    id: str
    created: int
    model: str

    def fields(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }


def chat_completion(head: Head, plan: Plan) -> dict[str, Any]:
    """The ``stream: false`` chat answer."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(plan.pieces),
        "refusal": None,
    }
    if plan.tool_call is not None:
        message["content"] = None
        message["tool_calls"] = [plan.tool_call.whole()]
    choices = [
        {"index": i, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}
        for i in range(plan.choices)
    ]
    return {**head.fields("chat.completion"), "choices": choices, "usage": plan.usage()}


def chat_chunk(
    head: Head, index: int, delta: dict[str, Any], finish: str | None, include_usage: bool
) -> dict[str, Any]:
    """One chunk with one choice; ``usage: null`` when usage will follow."""
    chunk = {
        **head.fields("chat.completion.chunk"),
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def chat_stream_steps(head: Head, plan: Plan, include_usage: bool) -> list[list[dict[str, Any]]]:
    """
    The chunks of a chat stream, grouped by the tick that sends them: the
    role, each piece, the finish (one chunk per choice in each).
    """
    call = plan.tool_call
    first: dict[str, Any] = {"role": "assistant", "content": ""}
    if call is not None:
        first = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ],
        }
    deltas = [first]
    for piece in plan.pieces:
        if call is not None:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            deltas.append({"content": piece})
    steps = [
        [chat_chunk(head, i, delta, None, include_usage) for i in range(plan.choices)]
        for delta in deltas
    ]
    steps.append(
        [chat_chunk(head, i, {}, plan.finish_reason, include_usage) for i in range(plan.choices)]
    )
    return steps


def usage_chunk(head: Head, kind: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage: no choices."""
    return {**head.fields(kind), "choices": [], "usage": usage}


# --------------------------------------------------------------------------
# Completions objects


def completion(head: Head, plans: Sequence[Plan]) -> dict[str, Any]:
    """The ``stream: false`` completions answer: ``n`` choices per prompt."""
    choices = []
    for number, plan in enumerate(plans):
        for i in range(plan.choices):
            choices.append(
                {
                    "text": plan.echo + "".join(plan.pieces),
                    "index": number * plan.choices + i,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            )
    return {**head.fields("text_completion"), "choices": choices, "usage": total_usage(plans)}


def completion_chunk(head: Head, index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {
        **head.fields("text_completion"),
        "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
    }


def completion_stream_steps(head: Head, plans: Sequence[Plan]) -> list[list[dict[str, Any]]]:
    """
    The chunks of a completions stream by tick: each piece (the echoed
    prompt before the first), then the finish, for every choice at once.
    """
    length = max(len(plan.pieces) for plan in plans)
    steps: list[list[dict[str, Any]]] = []
    for position in range(length + 1):
        step = []
        for number, plan in enumerate(plans):
            for i in range(plan.choices):
                index = number * plan.choices + i
                if position < len(plan.pieces):
                    text = (plan.echo if position == 0 else "") + plan.pieces[position]
                    step.append(completion_chunk(head, index, text, None))
                elif position == len(plan.pieces):
                    text = "" if plan.pieces else plan.echo  # max_tokens: 0 echoes only
                    step.append(completion_chunk(head, index, text, plan.finish_reason))
        steps.append(step)
    return steps


def total_usage(plans: Sequence[Plan]) -> dict[str, int]:
    prompt = sum(plan.prompt_tokens for plan in plans)
    completion_tokens = sum(plan.completion_tokens for plan in plans)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


# --------------------------------------------------------------------------
# Embeddings


def embedding_inputs(value: Any) -> list[str]:
    """A (validated) ``input`` as texts; token arrays become their numbers."""
    if isinstance(value, str):
        return [value]
    if _is_tokens(value):
        return [" ".join(str(t) for t in value)]
    return [v if isinstance(v, str) else " ".join(str(t) for t in v) for v in value]


def float32_base64(vector: Sequence[float]) -> str:
    """How OpenAI sends a vector for ``encoding_format: "base64"``."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings(model: str, texts: Sequence[str], dimensions: int, encoding: str) -> dict[str, Any]:
    """The embeddings ``list``: one unit vector per text, in order."""
    data = []
    for index, text in enumerate(texts):
        vector: Any = embed_vector(text, dimensions)
        if encoding == "base64":
            vector = float32_base64(vector)
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(count_words(text) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
