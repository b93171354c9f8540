"""
Where the words are in what plugins see, in both API families.

A place is a container and a key (a dict and its key, or a list and an
index), so a plugin can read the text there and put other text back.
Only text a person or a model wrote is listed: message contents (and their
text parts), prompts, inputs, system prompts and suffixes in requests; a
message's content, a completion's text or Ollama's ``response`` in answers
and chunks.  Tool calls, their arguments and images are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: A container and the key (or index) of a string in it.
Place = tuple[Any, Any]

#: Request fields that hold text or a list of texts, in both API families.
_TEXT_FIELDS = ("prompt", "input", "system", "suffix")


def request_texts(body: dict[str, Any]) -> Iterator[Place]:
    """Every place in a request body that holds text."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                yield from _content(message)
    for name in _TEXT_FIELDS:
        value = body.get(name)
        if isinstance(value, str):
            yield body, name
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    yield value, index


def _content(message: dict[str, Any]) -> Iterator[Place]:
    content = message.get("content")
    if isinstance(content, str):
        yield message, "content"
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part, "text"


def answer_texts(answer: dict[str, Any]) -> Iterator[Place]:
    """Every place in a whole answer that holds generated text."""
    choices = answer.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                yield message, "content"
            if isinstance(choice.get("text"), str):
                yield choice, "text"
    message = answer.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        yield message, "content"
    if isinstance(answer.get("response"), str):
        yield answer, "response"


@dataclass(frozen=True, slots=True)
class ChunkText:
    """
    Where one generation's text is in a chunk.

    :ivar index: the choice (always 0 for Ollama, which streams one).
    :ivar container: the dict the text is (or goes) in.
    :ivar key: its key there.
    :ivar final: whether this chunk ends that generation (OpenAI's
        ``finish_reason``, Ollama's ``done``).
    """

    index: int
    container: dict[str, Any]
    key: str
    final: bool

    @property
    def text(self) -> str:
        value = self.container.get(self.key)
        return value if isinstance(value, str) else ""


def chunk_texts(chunk: dict[str, Any]) -> list[ChunkText]:
    """
    The places of a chunk's text, one per generation it carries, present
    or not (a final chunk often has none, and may be given some).
    """
    found = []
    choices = chunk.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) else 0
            final = choice.get("finish_reason") is not None
            delta = choice.get("delta")
            if isinstance(delta, dict):
                found.append(ChunkText(index, delta, "content", final))
            elif "text" in choice:
                found.append(ChunkText(index, choice, "text", final))
        return found
    done = chunk.get("done") is True
    message = chunk.get("message")
    if isinstance(message, dict):
        found.append(ChunkText(0, message, "content", done))
    elif "response" in chunk:
        found.append(ChunkText(0, chunk, "response", done))
    return found


def chunk_with_text(template: dict[str, Any], index: int, text: str) -> dict[str, Any]:
    """
    A chunk carrying only ``text`` for generation ``index``, shaped like
    ``template`` (a chunk of the same stream): for text held back until a
    stream that ended without saying so for that generation.
    """
    if "choices" in template:
        head = {k: v for k, v in template.items() if k not in ("choices", "usage")}
        if template.get("object") == "text_completion":
            choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": None}
        else:
            choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
        return {**head, "choices": [choice]}
    head = {k: v for k, v in template.items() if k in ("model", "created_at")}
    if "message" in template:
        return {**head, "message": {"role": "assistant", "content": text}, "done": False}
    return {**head, "response": text, "done": False}
