"""
``pii-redact``: what it finds (and what it leaves), and that a stream split
anywhere, into any number of chunks, comes out exactly as the whole text
redacted at once.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oproxy.config.reading import structure
from oproxy.config.values import ConfigError
from oproxy.plugins.interface import Exchange
from oproxy.plugins.pii_redact import (
    KINDS,
    PIIRedact,
    PIIRedactOptions,
    Redactor,
    detectors,
    iban_checksum,
    luhn,
)

REDACTOR = Redactor(detectors(KINDS, [r"ACME-\d{4}", r"project titan"]), 128)


def plugin(**options: Any) -> PIIRedact:
    return PIIRedact(structure(options, PIIRedactOptions))


def exchange(route: str = "/v1/chat/completions", api: str = "openai") -> Exchange:
    return Exchange(route, api, "alice", "llama3.2", "req_1", 0.0)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("Mail john.doe@example.com now", "Mail [EMAIL] now"),
        ("at jane+tag@mail.sub.example.co.uk.", "at [EMAIL]."),
        ("not an address: a@b, @home, x@y.z", "not an address: a@b, @home, x@y.z"),
        ("Call +1 415 555 2671.", "Call [PHONE]."),
        ("Call (415) 555-2671 or 415-555-2671", "Call [PHONE] or [PHONE]"),
        ("UK 020 7946 0958, short 555-2671", "UK [PHONE], short [PHONE]"),
        ("+4915112345678 is German", "[PHONE] is German"),
        ("visa 4111 1111 1111 1111 mc 5500-0000-0000-0004", "visa [CARD] mc [CARD]"),
        ("amex 378282246310005.", "amex [CARD]."),
        ("IBAN DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432", "IBAN [IBAN] or [IBAN]"),
        ("IBAN DE89 3704 0044 0532 0130 00 AND MORE", "IBAN [IBAN] AND MORE"),
        ("custom ACME-1234 and Project Titan and project titan", None),
    ],
)
def test_what_is_found(text: str, redacted: str | None) -> None:
    if redacted is None:
        redacted = "custom [REDACTED] and Project Titan and [REDACTED]"
    assert REDACTOR.redact(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "card-like but not Luhn: 4111 1111 1111 1112",
        "not an IBAN: DE88 3704 0044 0532 0130 00",
        "dates 2024-01-15 and 15.01.2024, the time 10:30",
        "an address 192.168.100.200, a version 1.22.333",
        "pi is 3.14159265358, a billion is 1 000 000 000",
        "order 1234567 and port 8080",
    ],
)
def test_what_is_left_alone(text: str) -> None:
    assert REDACTOR.redact(text) == text


def test_the_checksums() -> None:
    assert luhn("4111111111111111") and luhn("5500000000000004") and luhn("378282246310005")
    assert not luhn("4111111111111112")
    assert iban_checksum("DE89370400440532013000")
    assert iban_checksum("GB82WEST12345698765432")
    assert not iban_checksum("GB82WEST12345698765433")
    assert not iban_checksum("DE8937")


def test_one_marker_for_every_kind() -> None:
    redactor = Redactor(detectors(("email", "card"), [], replacement="***"), 128)
    assert redactor.redact("a@example.com 4111111111111111 +1 415 555 2671") == (
        "*** *** +1 415 555 2671"
    )


# -- streams ------------------------------------------------------------------------


def streamed(pieces: list[str], redactor: Redactor = REDACTOR) -> str:
    """What a stream of ``pieces`` becomes, as the plugin releases it."""
    held, released, out = "", "", []
    for piece in pieces:
        text = held + piece
        part, held = redactor.split(text, released)
        released = (released + text[: len(text) - len(held)])[-8:]
        out.append(part)
    out.append(redactor.redact(held, released))
    return "".join(out)


SAMPLES = [
    "Mail john.doe@example.com or jane@sub.example.co.uk.",
    "Call +1 415 555 2671 or (415) 555-2671 or 020 7946 0958 or 555-2671.",
    "Card 4111 1111 1111 1111 and 4111-1111-1111-1112 and 5500000000000004.",
    "IBAN DE89 3704 0044 0532 0130 00 AND GB82WEST12345698765432 ok",
    "Dates 2024-01-15, pi 3.14159265358, order ACME-1234, project titan.",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_a_stream_split_at_every_position_is_redacted_as_the_whole(text: str) -> None:
    whole = REDACTOR.redact(text)
    assert whole != text
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == whole, cut
    for first in range(0, len(text) + 1, 2):
        for second in range(first, len(text) + 1, 3):
            pieces = [text[:first], text[first:second], text[second:]]
            assert streamed(pieces) == whole, (first, second)
    assert streamed(list(text)) == whole


FRAGMENTS = [
    "john.doe@example.com",
    "x@y.io",
    "+44 20 7946 0958",
    "(415) 555-2671",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "DE89 3704 0044 0532 0130 00",
    "GB82WEST12345698765432",
    "ACME-1234",
    "project titan",
    "2024-01-15",
    "3.14159",
    "hello",
    "world.",
    " ",
    ", ",
    "-",
    "42",
    "@",
    "+",
]


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_split_of_any_text_is_redacted_as_the_whole(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert streamed(pieces) == REDACTOR.redact(text)


def test_a_match_longer_than_the_holdback_is_released() -> None:
    redactor = Redactor(detectors(("email",), []), holdback=8)
    part, held = redactor.split("write to averyveryverylongname")
    assert len(held) <= 8 and part + held == "write to averyveryverylongname"


def test_only_what_could_still_be_a_match_is_held_back() -> None:
    assert REDACTOR.split("see you at ") == ("see you at ", "")
    assert REDACTOR.split("mail john@exa") == ("mail ", "john@exa")
    assert REDACTOR.split("card 4111 1111 ") == ("card ", "4111 1111 ")
    assert REDACTOR.split("done. mail me@example.com") == ("done. mail ", "me@example.com")
    assert REDACTOR.split("mail me@example.com and") == ("mail [EMAIL] ", "and")


# -- the plugin -----------------------------------------------------------------------


def test_requests_of_both_families_are_redacted() -> None:
    redact = plugin()
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Reach ops@example.com"},
            {"role": "user", "content": [{"type": "text", "text": "I am +1 415 555 2671"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x@y.io"}}]},
        ],
    }
    redact.on_request(exchange(), chat)
    assert chat["messages"][0]["content"] == "Reach [EMAIL]"
    assert chat["messages"][1]["content"][0]["text"] == "I am [PHONE]"
    assert chat["messages"][2]["content"][0]["image_url"]["url"] == "x@y.io"
    generate = {"model": "m", "prompt": "card 4111111111111111", "system": "a@b.io", "suffix": "x"}
    redact.on_request(exchange("/api/generate", "ollama"), generate)
    assert generate == {"model": "m", "prompt": "card [CARD]", "system": "[EMAIL]", "suffix": "x"}
    embeddings = {"model": "m", "input": ["a@example.com", [1, 2], "plain"]}
    redact.on_request(exchange("/v1/embeddings"), embeddings)
    assert embeddings["input"] == ["[EMAIL]", [1, 2], "plain"]


def test_answers_are_left_alone_unless_asked() -> None:
    from oproxy.plugins.interface import IChunkHook, IResponseHook

    assert not IResponseHook.providedBy(plugin()) and not IChunkHook.providedBy(plugin())
    both = plugin(answers=True)
    assert IResponseHook.providedBy(both) and IChunkHook.providedBy(both)
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a@b.io"}}]}
    both.on_response(exchange(), answer)
    assert answer["choices"][0]["message"]["content"] == "[EMAIL]"
    native = {"message": {"role": "assistant", "content": "x 4111111111111111"}, "done": True}
    both.on_response(exchange("/api/chat", "ollama"), native)
    assert native["message"]["content"] == "x [CARD]"
    generated = {"response": "call +1 415 555 2671", "done": True}
    both.on_response(exchange("/api/generate", "ollama"), generated)
    assert generated["response"] == "call [PHONE]"


def openai_chunk(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def test_openai_chunks_of_several_choices_are_redacted_each_on_its_own() -> None:
    redact = plugin(answers=True)
    x = exchange()
    pieces = [
        openai_chunk(0, "mail jo"),
        openai_chunk(1, "card 4111 "),
        openai_chunk(0, "hn@exam"),
        openai_chunk(1, "1111 1111 1111 ok"),
        openai_chunk(0, "ple.com"),
        openai_chunk(1, None, "stop"),
        openai_chunk(0, None, "stop"),
    ]
    out: dict[int, str] = {0: "", 1: ""}
    for piece in pieces:
        assert redact.on_chunk(x, piece) is None
        choice = piece["choices"][0]
        out[choice["index"]] += choice["delta"].get("content", "")
    assert out == {0: "mail [EMAIL]", 1: "card [CARD] ok"}
    assert redact.on_chunk(x, None) == []


def test_what_is_held_when_a_stream_ends_unannounced_is_sent_in_a_last_chunk() -> None:
    redact = plugin(answers=True)
    x = exchange()
    first = openai_chunk(0, "write to me@exa")
    redact.on_chunk(x, first)
    assert first["choices"][0]["delta"]["content"] == "write to "
    [last] = redact.on_chunk(x, None)
    assert last["choices"] == [{"index": 0, "delta": {"content": "me@exa"}, "finish_reason": None}]
    assert (last["id"], last["object"], last["model"]) == (
        "chatcmpl-1",
        "chat.completion.chunk",
        "m",
    )


def test_ollama_lines_are_redacted_and_flushed_at_done() -> None:
    redact = plugin(answers=True)
    x = exchange("/api/chat", "ollama")
    lines = [
        {"model": "m", "message": {"role": "assistant", "content": "IBAN DE89 3704 0044 "}},
        {"model": "m", "message": {"role": "assistant", "content": "0532 0130 00"}},
        {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True},
    ]
    for line in lines:
        line.setdefault("done", False)
        redact.on_chunk(x, line)
    assert "".join(line["message"]["content"] for line in lines) == "IBAN [IBAN]"
    assert lines[2]["message"]["content"] == "[IBAN]"
    generate = exchange("/api/generate", "ollama")
    pieces = [{"response": "a@", "done": False}, {"response": "b.io", "done": False}]
    for piece in pieces:
        redact.on_chunk(generate, piece)
    [last] = redact.on_chunk(generate, None)
    assert "".join(p["response"] for p in pieces) + last["response"] == "[EMAIL]"


@pytest.mark.parametrize(
    ("options", "key", "problem"),
    [
        ({"requests": False}, "answers", "nothing to redact"),
        ({"detect": []}, "detect", "nothing to find"),
        ({"detect": ["ssn"]}, "detect[0]", "must be one of email, phone, card, iban"),
        ({"patterns": ["ok", "(unclosed"]}, "patterns[1]", "must be a regular expression"),
        ({"holdback": 0}, "holdback", "must be a positive whole number"),
    ],
)
def test_bad_options(options: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        structure(options, PIIRedactOptions)
    assert raised.value.key == key and problem in raised.value.problem
