"""
``pii-redact``: personal data out of prompts (and, if asked, out of answers).

Finds e-mail addresses, phone numbers, card numbers (Luhn-checked), IBANs
(checksum-checked) and the operator's own regular expressions, and puts a
marker in their place (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``,
``[REDACTED]``).  Requests are redacted before they are routed, so the model
never sees the data and the cache key is made from the redacted body;
answers (``answers: true``) before they are sent, whole or streamed.

Streams are redacted as they flow, safely across chunk boundaries: the
end of what has arrived that could be the beginning of a match (a word
that could be an address's local part, digits that could be a card's
first ones) is held back until the next chunk says whether it is, at most
``holdback`` characters, and released at the end of the generation.  What
reaches the client is what redacting the whole text at once gives, for
any split into chunks, as long as no match is longer than ``holdback``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import attrs
import regex
from zope.interface import alsoProvides, implementer

from oproxy.config.values import ConfigError, Count, invalid, one_of, string
from oproxy.plugins.interface import (
    JSON,
    Exchange,
    IChunkHook,
    IRequestHook,
    IResponseHook,
    PluginFactory,
    from_options,
)
from oproxy.plugins.texts import answer_texts, chunk_texts, chunk_with_text, request_texts

KINDS = ("email", "phone", "card", "iban")

#: What a lookbehind needs to see of the text before a piece: the last
#: characters already released.
CONTEXT = 8


def regular_expression(value: Any) -> str:
    text = string(value)
    try:
        regex.compile(text)
    except regex.error as e:
        raise invalid(f"must be a regular expression ({e})") from None
    return text


Kind = Annotated[str, one_of(*KINDS)]
RegularExpression = Annotated[str, regular_expression]


@attrs.frozen
class PIIRedactOptions:
    """
    :ivar detect: the built-in kinds to look for.
    :ivar patterns: more, as regular expressions (each match is replaced
        by ``[REDACTED]``).
    :ivar requests: redact what is sent to the model.
    :ivar answers: redact what the model says, too.
    :ivar replacement: one marker for every kind, instead of each its own.
    :ivar holdback: the most characters of a stream held back while they
        could still become a match.
    """

    detect: tuple[Kind, ...] = KINDS
    patterns: tuple[RegularExpression, ...] = ()
    requests: bool = True
    answers: bool = False
    replacement: str | None = None
    holdback: Count = 128

    def __attrs_post_init__(self) -> None:
        if not self.requests and not self.answers:
            raise ConfigError("answers", "requests and answers are both false: nothing to redact")
        if not self.detect and not self.patterns:
            raise ConfigError("detect", "is empty and there are no patterns: nothing to find")


# -- detection (pure) -------------------------------------------------------------------


def luhn(digits: str) -> bool:
    """The Luhn checksum every payment card number passes."""
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(candidate: str) -> int:
    digits = "".join(c for c in candidate if c.isdigit())
    return len(candidate) if 13 <= len(digits) <= 19 and luhn(digits) else 0


def iban_checksum(compact: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, mod 97 is 1."""
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _iban(candidate: str) -> int:
    """The longest prefix (ending where a group ends) that is a valid IBAN."""
    ends = [len(candidate)] + [i for i in range(len(candidate) - 1, 0, -1) if candidate[i] == " "]
    for end in ends:
        if iban_checksum(candidate[:end].replace(" ", "")):
            return end
    return 0


_DATE = regex.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4})$")
_DOTTED = regex.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_THOUSANDS = regex.compile(r"^\d{1,3}(?:[ .]\d{3})+$")
_DECIMAL = regex.compile(r"^\d+\.\d+$")


def _phone(candidate: str) -> int:
    """
    Whether a run of digits and separators reads as a phone number rather
    than a date, an address, an amount or a decimal: international (``+``),
    with an area code in parentheses, ten digits or more, or with dashes.
    """
    digits = sum(c.isdigit() for c in candidate)
    if not 7 <= digits <= 15:
        return 0
    if candidate.startswith(("+", "(")):
        return len(candidate)
    if any(p.match(candidate) for p in (_DATE, _DOTTED, _THOUSANDS, _DECIMAL)):
        return 0
    return len(candidate) if digits >= 10 or "-" in candidate else 0


@dataclass(frozen=True)
class Detector:
    """
    One kind of data: where it may be (a pattern), whether a candidate is
    it (``accept`` gives the length of the accepted prefix, 0 for none),
    and what replaces it.
    """

    pattern: Any
    replacement: str
    accept: Callable[[str], int] | None = None


_BUILT_IN = {
    "card": (r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)", "[CARD]", _card),
    "iban": (r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,32}(?![A-Za-z0-9])", "[IBAN]", _iban),
    "email": (
        r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])",
        "[EMAIL]",
        None,
    ),
    "phone": (
        r"(?<![\w+()]|\d[ .-])(?:\+\d{1,3}[ .-]?|\(\d{1,4}\)[ .-]?)?"
        r"\(?\d(?:\)?[ .-]?\(?\d){5,14}(?!\w|[ .-]\d)",
        "[PHONE]",
        _phone,
    ),
}


def detectors(
    kinds: Sequence[str], patterns: Sequence[str], replacement: str | None = None
) -> list[Detector]:
    """The detectors, in the order they win a tie (same start, same length)."""
    found = [
        Detector(regex.compile(_BUILT_IN[kind][0]), replacement or _BUILT_IN[kind][1], accept)
        for kind in ("card", "iban", "email", "phone")
        if kind in kinds
        for accept in (_BUILT_IN[kind][2],)
    ]
    found += [Detector(regex.compile(p), replacement or "[REDACTED]") for p in patterns]
    return found


Span = tuple[int, int, str]


class Redactor:
    """
    Redact text whole (:meth:`redact`) or as it streams (:meth:`split`).

    Every method takes the ``context``: the characters just before the
    text, already released, that a pattern's lookbehind may need to see.
    """

    def __init__(self, found: list[Detector], holdback: int) -> None:
        self._detectors = found
        self.holdback = holdback

    def _spans(self, text: str, start: int) -> list[Span]:
        """The matches in ``text[start:]``: earliest first, then longest, none overlapping."""
        candidates: list[tuple[int, int, int, str]] = []
        for rank, detector in enumerate(self._detectors):
            # Every place a match may begin, not only where the last one
            # ended: a candidate that fails its check (a number that is not a
            # card) must not hide one that begins inside it.
            for match in detector.pattern.finditer(text, start, overlapped=True):
                if match.end() == match.start():
                    continue
                length = match.end() - match.start()
                if detector.accept is not None:
                    length = detector.accept(match.group())
                if length:
                    candidates.append((match.start(), -length, rank, detector.replacement))
        candidates.sort()
        spans: list[Span] = []
        reached = start
        for begin, negative, _, replacement in candidates:
            if begin >= reached:
                spans.append((begin, begin - negative, replacement))
                reached = begin - negative
        return spans

    @staticmethod
    def _replaced(text: str, start: int, end: int, spans: list[Span]) -> str:
        out = []
        at = start
        for begin, finish, replacement in spans:
            if finish > end:
                break
            out.append(text[at:begin])
            out.append(replacement)
            at = finish
        out.append(text[at:end])
        return "".join(out)

    def redact(self, text: str, context: str = "") -> str:
        whole = context + text
        base = len(context)
        return self._replaced(whole, base, len(whole), self._spans(whole, base))

    def split(self, text: str, context: str = "") -> tuple[str, str]:
        """
        What can be released of ``text`` now (redacted), and what must be
        held back: the end that could still be (or become) the beginning
        of a match, at most :attr:`holdback` characters.
        """
        whole = context + text
        base, end = len(context), len(whole)
        spans = self._spans(whole, base)
        bound = max(base, end - self.holdback)
        hold = end
        for detector in self._detectors:
            hold = min(hold, _could_reach(detector.pattern, whole, bound, hold))
        for begin, finish, _ in spans:
            if begin < hold < finish:
                hold = finish  # a whole match longer than the bound: released
        return self._replaced(whole, base, hold, spans), whole[hold:]


def _could_reach(pattern: Any, text: str, start: int, end: int) -> int:
    """
    The first position in ``text[start:end]`` from which ``pattern`` could
    match up to the end of ``text`` and beyond (``end`` if there is none).

    A match found there that stops short may still be the short form of
    a longer one (``jane@example.co`` of ``jane@example.com``), so each
    place a match (complete or partial) begins is asked whether the whole
    rest of the text could be the beginning of a match.
    """
    for match in pattern.finditer(text, start, end, overlapped=True, partial=True):
        at = match.start()
        if match.end() == len(text) or pattern.fullmatch(text, at, partial=True) is not None:
            return int(at)
    return end


# -- the plugin -----------------------------------------------------------------------


@implementer(IRequestHook)
class PIIRedact:
    """Redacts requests; answers and chunks too when its options say so."""

    def __init__(self, options: PIIRedactOptions) -> None:
        self.options = options
        self.redactor = Redactor(
            detectors(options.detect, options.patterns, options.replacement), options.holdback
        )
        if options.answers:
            alsoProvides(self, IResponseHook, IChunkHook)

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        if self.options.requests:
            redact = self.redactor.redact
            for container, key in request_texts(body):
                container[key] = redact(container[key])

    def on_response(self, exchange: Exchange, answer: JSON) -> None:
        redact = self.redactor.redact
        for container, key in answer_texts(answer):
            container[key] = redact(container[key])

    def on_chunk(self, exchange: Exchange, chunk: JSON | None) -> list[JSON] | None:
        state = exchange.state
        held: dict[int, str] = state.setdefault("held", {})
        released: dict[int, str] = state.setdefault("released", {})
        if chunk is None:
            template = state.get("template")
            if template is None:
                return None
            redact = self.redactor.redact
            return [
                chunk_with_text(template, index, redact(text, released.get(index, "")))
                for index, text in sorted(held.items())
                if text
            ]
        for place in chunk_texts(chunk):
            if "template" not in state:
                state["template"] = template = {
                    k: v for k, v in chunk.items() if k not in ("choices", "usage")
                }
                if "choices" in chunk:
                    template["choices"] = []
            index = place.index
            text = held.get(index, "") + place.text
            context = released.get(index, "")
            if place.final:
                out, rest = self.redactor.redact(text, context), ""
            else:
                out, rest = self.redactor.split(text, context)
            held[index] = rest
            released[index] = (context + text[: len(text) - len(rest)])[-CONTEXT:]
            if out or place.key in place.container:
                place.container[place.key] = out
        return None


factory = PluginFactory(
    "pii-redact",
    from_options(PIIRedact),
    options=PIIRedactOptions,
    description="Redact e-mail addresses, phone numbers, card numbers, IBANs and patterns.",
)
