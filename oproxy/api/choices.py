"""
Requests that run several generations: a list of prompts, ``n`` choices.

OpenAI answers ``n`` choices, and a choice per prompt of a list, in one
response.  Ollama, and many OpenAI-compatible servers (LM Studio,
llama.cpp's server), make one choice per call.  So the proxy runs one
generation per prompt and choice, the same way on every kind of backend
(``n`` is never sent upstream), and joins them:

* indexes are OpenAI's: ``prompt_index * n + choice_index`` for
  completions, the choice index for chat;
* with a ``seed`` *s*, choice *i* of each prompt is generated with seed
  *s + i* (wrapping within 64 bits), so the choices differ and choice 0 is
  the answer to the same request with ``n: 1``; without one, each
  generation is unseeded;
* ``usage`` is the sum over the generations;
* streams interleave the generations' chunks as they come, each carrying
  its choice's index and its own ``finish_reason``, under one id, and end
  with one summed usage chunk when ``stream_options.include_usage`` asks.

At most ``limits.generation_concurrency`` generations of one request run
at a time; the first failure cancels the others (closing their upstream
connections) and starts no more, and a client that leaves cancels them all.

Everything is checked before anything is charged or sent: a prompt list
over ``limits.max_prompts``, an ``n`` over ``limits.max_n`` or under 1, and
a ``best_of`` that is not ``n`` are refused with a 400.  A request of one
generation (the usual case) goes straight to the backend, as before.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeVar

from oproxy.api.answer import answer
from oproxy.api.scope import Scope
from oproxy.backends.base import Call, IBackend
from oproxy.config import RequestLimits
from oproxy.errors import InvalidRequest
from oproxy.routing.router import Route
from oproxy.streaming import merge
from oproxy.together import run_bounded
from oproxy.translate.common import (
    INT64_MAX,
    INT64_MIN,
    as_integer,
    invalid_value,
    new_completion_id,
    present,
    unsupported_value,
    wants_usage_chunk,
    wrong_type,
)

T = TypeVar("T")

Kind = Literal["chat", "completions"]
Chunks = AsyncGenerator[dict[str, Any], None]
#: A backend's one-generation call, e.g. ``backend.chat_completion``.
Generate = Callable[[Call, Mapping[str, Any]], Awaitable[dict[str, Any]]]
#: A backend's one-generation stream, e.g. ``backend.chat_completion_stream``.
OpenStream = Callable[[Call, Mapping[str, Any]], Awaitable[Chunks]]

#: What a generation's body does not carry: the proxy makes the choices.
_FANNED_OUT: Final = frozenset({"n", "best_of"})
_ID_PREFIX: Final[Mapping[str, str]] = {"chat": "chatcmpl-", "completions": "cmpl-"}
_USAGE_KEYS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")

#: What a backend is asked for one generation of each kind, whole or streamed.
_BACKEND_CALLS: Final[
    Mapping[Kind, tuple[Callable[[IBackend], Generate], Callable[[IBackend], OpenStream]]]
] = {
    "chat": (
        lambda backend: backend.chat_completion,
        lambda backend: backend.chat_completion_stream,
    ),
    "completions": (
        lambda backend: backend.completion,
        lambda backend: backend.completion_stream,
    ),
}


# --------------------------------------------------------------------------
# What a request asks for, checked before anything starts


@dataclass(frozen=True)
class Generations:
    """
    The generations one chat or completions request runs.

    :ivar n: the choices asked for each prompt.
    :ivar prompts: the prompts a completions list splits into, or ``None``
        when the body's ``prompt`` is sent as it is (a string, one prompt).
    :ivar concurrency: how many run at once.
    """

    kind: Kind
    n: int
    prompts: tuple[Any, ...] | None
    concurrency: int

    @property
    def count(self) -> int:
        return self.n * (len(self.prompts) if self.prompts is not None else 1)

    def bodies(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One body per generation, in index order, each asking for one choice."""
        base = {key: value for key, value in body.items() if key not in _FANNED_OUT}
        prompts: Sequence[Any] = self.prompts if self.prompts is not None else (None,)
        bodies = []
        for prompt in prompts:
            for choice in range(self.n):
                one = _seeded(base, choice)
                if self.prompts is not None:
                    one["prompt"] = prompt
                bodies.append(one)
        return bodies

    async def answer(
        self, call: Call, body: Mapping[str, Any], generate: Generate
    ) -> dict[str, Any]:
        """The whole answer: every generation's choice in one response."""
        if self.count == 1:
            return await generate(call, body)
        tally = _Tally()
        each = replace(call, on_usage=tally.add)
        results = await run_bounded(
            [_bound(generate, each, one) for one in self.bodies(body)], self.concurrency
        )
        joined = joined_answer(results)
        if tally.reported:
            joined["usage"] = dict(tally.usage)
            call.on_usage(tally.usage)
        return joined

    async def stream(self, call: Call, body: Mapping[str, Any], open_stream: OpenStream) -> Chunks:
        """
        The answer's chunks.  A single generation's stream is opened here,
        so that its early errors are raised here; several open as they are
        pulled, at most :attr:`concurrency` at a time.
        """
        if self.count == 1:
            return await open_stream(call, body)
        return self._interleaved(call, body, open_stream)

    async def _interleaved(
        self, call: Call, body: Mapping[str, Any], open_stream: OpenStream
    ) -> Chunks:
        tally = _Tally()
        each = replace(call, on_usage=tally.add, on_cut_short=tally.add_cut_short)
        completion_id = new_completion_id(_ID_PREFIX[self.kind])
        streams = [
            _indexed(index, _bound(open_stream, each, one), completion_id, call.created)
            for index, one in enumerate(self.bodies(body))
        ]
        envelope: dict[str, Any] | None = None
        finished = False
        try:
            async with aclosing(merge(streams, concurrency=self.concurrency)) as chunks:
                async for chunk in chunks:
                    if envelope is None:
                        envelope = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
                    yield chunk
            finished = True
        finally:
            if not finished:
                # Cut short (the client left, a generation failed): count
                # what was generated, as a single stream's is counted.
                generated = tally.usage["completion_tokens"] + tally.cut_short
                if generated:
                    call.on_cut_short(generated)
        call.on_usage(tally.usage)
        if envelope is not None and wants_usage_chunk(body):
            yield {**envelope, "choices": [], "usage": dict(tally.usage)}


def requested_generations(
    kind: Kind, body: Mapping[str, Any], limits: RequestLimits
) -> Generations:
    """
    What ``body`` asks for, within the server's limits.

    :raises InvalidRequest: ``n`` is not a whole number from 1 to
        ``limits.max_n``; a prompt list is longer than
        ``limits.max_prompts``; ``best_of`` is not ``n``.
    """
    n = _requested_n(body, limits.max_n)
    prompts = None
    if kind == "completions":
        prompts = _prompt_list(body, limits.max_prompts)
        _check_best_of(body, n)
    return Generations(kind, n, prompts, limits.generation_concurrency)


async def answer_generations(
    scope: Scope,
    kind: Kind,
    image_urls: Callable[[Mapping[str, Any]], list[str]] | None = None,
) -> bytes | None:
    """
    Answer a chat or completions request, one generation per prompt and
    choice: checked (a 400) before the caller's limits are charged, then
    from the cache or from the first route that answers.

    :param image_urls: a chat's remote image URLs, read from its body for
        each route tried; ``None`` for a request without images.
    """
    generate, open_stream = _BACKEND_CALLS[kind]
    generations = requested_generations(kind, scope.body, scope.config.limits)
    model, routes = await scope.admitted_routes(kind)

    async def call(route: Route) -> Call:
        if image_urls is None:
            return await scope.call(route)
        return await scope.call(route, image_urls(scope.body))

    async def produce(route: Route) -> dict[str, Any]:
        made = await call(route)
        return await generations.answer(made, route.body(scope.body), generate(route.backend))

    async def produce_stream(route: Route) -> Chunks:
        made = await call(route)
        return await generations.stream(made, route.body(scope.body), open_stream(route.backend))

    return await answer(
        scope,
        kind,
        model,
        routes,
        stream=scope.stream(),
        produce=produce,
        produce_stream=produce_stream,
    )


def _requested_n(body: Mapping[str, Any], max_n: int) -> int:
    value = present(body, "n")
    if value is None:
        return 1
    n = as_integer(value, "n")
    if n < 1:
        raise InvalidRequest(
            f"Invalid 'n': integer below minimum value. Expected a value >= 1, "
            f"but got {n} instead.",
            param="n",
            code="integer_below_min_value",
        )
    if n > max_n:
        raise InvalidRequest(
            f"Invalid 'n': integer above maximum value. Expected a value <= {max_n} "
            f"(this server's limits.max_n), but got {n} instead.",
            param="n",
            code="integer_above_max_value",
        )
    return n


def _prompt_list(body: Mapping[str, Any], max_prompts: int) -> tuple[Any, ...] | None:
    """
    The prompts of a list of several, each a string or a list of token ids;
    ``None`` for anything else (one string, one token list, a list of one),
    which the backend is given as it is.
    """
    prompt = present(body, "prompt")
    if not isinstance(prompt, list) or len(prompt) < 2 or _is_token(prompt[0]):
        return None
    if len(prompt) > max_prompts:
        raise InvalidRequest(
            f"Invalid 'prompt': array too long. Expected an array with maximum length "
            f"{max_prompts} (this server's limits.max_prompts), but got an array with "
            f"length {len(prompt)} instead.",
            param="prompt",
            code="array_above_max_length",
        )
    for index, item in enumerate(prompt):
        if not isinstance(item, str) and not (
            isinstance(item, list) and all(_is_token(token) for token in item)
        ):
            raise wrong_type(f"prompt.{index}", "a string", item)
    return tuple(prompt)


def _check_best_of(body: Mapping[str, Any], n: int) -> None:
    """
    ``best_of``: OpenAI's rule that it be at least ``n``.  Ranking more
    candidates than are returned is not done, so only ``best_of == n`` (all
    of them) is served.
    """
    value = present(body, "best_of")
    if value is None:
        return
    best_of = as_integer(value, "best_of", minimum=1)
    if best_of < n:
        raise invalid_value(
            "best_of",
            f"Invalid 'best_of': best_of must be greater than or equal to n, but got "
            f"best_of {best_of} and n {n}.",
        )
    if best_of > n:
        raise unsupported_value(
            "best_of",
            f"Invalid value for 'best_of': only a best_of equal to n is supported by this "
            f"server (it does not rank candidates), got best_of {best_of} and n {n}.",
        )


def derived_seed(seed: int, choice: int) -> int:
    """Choice ``choice``'s seed: ``seed + choice``, wrapped into the int64 range."""
    return (seed + choice - INT64_MIN) % 2**64 + INT64_MIN


def _seeded(body: Mapping[str, Any], choice: int) -> dict[str, Any]:
    """
    A copy of ``body`` with choice ``choice``'s seed: from ``seed``, else
    from Ollama's ``options.seed`` (the OpenAI field wins, as everywhere).
    A seed that is not an int64 is left for the translation to refuse.
    """
    one = dict(body)
    seed = _whole(present(body, "seed"))
    if seed is not None:
        if INT64_MIN <= seed <= INT64_MAX:
            one["seed"] = derived_seed(seed, choice)
        return one
    options = body.get("options")
    seed = _whole(options.get("seed")) if isinstance(options, Mapping) else None
    if seed is not None and INT64_MIN <= seed <= INT64_MAX and isinstance(options, Mapping):
        one["options"] = {**options, "seed": derived_seed(seed, choice)}
    return one


def _whole(value: Any) -> int | None:
    """An integer, also when sent as ``7.0``; ``None`` for anything else."""
    if _is_token(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------
# Running and joining


def _bound(
    start: Callable[[Call, Mapping[str, Any]], Awaitable[T]], call: Call, body: Mapping[str, Any]
) -> Callable[[], Awaitable[T]]:
    """``start(call, body)``, to be called when its turn comes (not before)."""
    return lambda: start(call, body)


def joined_answer(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """
    One response from each generation's, in generation order: the first's
    envelope (id, created, model, ...), every choice re-indexed and sorted.
    """
    choices = []
    for index, result in enumerate(results):
        for choice in result.get("choices") or ():
            if isinstance(choice, dict):
                choice["index"] = index + _local_index(choice)
                choices.append(choice)
    choices.sort(key=lambda choice: choice["index"])
    return {**results[0], "choices": choices}


def _local_index(choice: Mapping[str, Any]) -> int:
    """A choice's index within its generation's answer (0: one choice each)."""
    index = choice.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) and index > 0 else 0


async def _indexed(
    index: int, opening: Callable[[], Awaitable[Chunks]], completion_id: str, created: int
) -> Chunks:
    """
    One generation's chunks as parts of the whole stream: its choice index,
    the stream's id and time; its own usage chunk dropped (the whole
    stream's comes at the end).

    The upstream call starts on the first pull, so that a merge bounded to
    a few at a time really has only a few open.
    """
    chunks = await opening()
    async with aclosing(chunks):
        async for chunk in chunks:
            choices = chunk.get("choices")
            if not choices:
                continue
            for choice in choices:
                if isinstance(choice, dict):
                    choice["index"] = index + _local_index(choice)
            chunk["id"] = completion_id
            chunk["created"] = created
            if chunk.get("usage") is not None:
                chunk["usage"] = None
            yield chunk


class _Tally:
    """The usage of a request's generations, added up as each reports it."""

    def __init__(self) -> None:
        self.usage = dict.fromkeys(_USAGE_KEYS, 0)
        self.reported = 0
        #: Completion tokens of generations cut short (no usage from them).
        self.cut_short = 0

    def add(self, usage: Mapping[str, int]) -> None:
        self.reported += 1
        for key in _USAGE_KEYS:
            self.usage[key] += usage.get(key, 0)

    def add_cut_short(self, generated: int) -> None:
        self.cut_short += generated
