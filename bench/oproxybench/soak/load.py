"""
The soak's clients: threads sending chat requests through the official
``openai`` SDK, half of them streamed, one request at a time each, with a
short random pause between requests; and what became of every request.

The SDK does not retry (``max_retries=0``) and every request asks for its
connection to be closed after the answer (``Connection: close``), so a
request fails only when the request itself did: a stale pooled connection
to a killed worker cannot fail the next one.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from ..common import log

MODEL = "llama3.2"
#: Every request asks the same thing, so that every answer, its usage and
#: its token reservation are the same, and a difference of one request's
#: worth of tokens stands out.
PROMPT = "Tell me why the sky looks blue on a clear day, in a few words please."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
TIMEOUT = 60.0


@dataclass
class Outcome:
    """
    One request and what became of it.

    :ivar started: seconds after the load started when it was sent.
    :ivar ended: when its answer was whole, or it failed.
    :ivar failure: what went wrong (None: it succeeded), see :func:`failure_of`.
    :ivar cause: for a failure, the fault it is put down to (see
        :func:`~oproxybench.soak.accounting.cause_of`).
    :ivar chunks: the chunks of a streamed answer that arrived.
    :ivar first_chunk: when the first chunk arrived.
    """

    key: str
    stream: bool
    started: float
    ended: float = 0.0
    failure: str | None = None
    detail: str = ""
    cause: str = ""
    chunks: int = 0
    first_chunk: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def usage(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def failure_of(error: BaseException, chunks: int) -> str:
    """
    What a failed request looked like to its client.

    ``connection lost`` (before any answer), ``stream cut`` (a stream that
    had started), ``error event`` (a stream that ended with an error in
    band), ``HTTP <status>``, ``timeout``, else the exception's type.
    """
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}"
    transport = type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")
    if isinstance(error, openai.APIConnectionError) or transport:
        return "stream cut" if chunks else "connection lost"
    if isinstance(error, openai.APIError):
        return "error event"
    return type(error).__name__


def client_for(base_url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url,
        api_key=token,
        max_retries=0,
        timeout=TIMEOUT,
        default_headers={"Connection": "close"},
    )


def send(client: openai.OpenAI, outcome: Outcome, clock: Callable[[], float]) -> Outcome:
    """Send one chat request; fill in ``outcome`` with what happened."""
    try:
        if outcome.stream:
            stream = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            parts = []
            for chunk in stream:
                outcome.chunks += 1
                if outcome.first_chunk is None:
                    outcome.first_chunk = clock()
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    outcome.prompt_tokens = chunk.usage.prompt_tokens
                    outcome.completion_tokens = chunk.usage.completion_tokens
            outcome.content = "".join(parts)
            if outcome.usage is None:
                outcome.failure, outcome.detail = "no usage", "the stream ended without usage"
        else:
            answer = client.chat.completions.create(model=MODEL, messages=MESSAGES)
            outcome.content = answer.choices[0].message.content or ""
            if answer.usage is not None:
                outcome.prompt_tokens = answer.usage.prompt_tokens
                outcome.completion_tokens = answer.usage.completion_tokens
    except Exception as error:  # every failure is classified, none stops the load
        outcome.failure = failure_of(error, outcome.chunks)
        cause = error.__cause__ or error.__context__
        outcome.detail = f"{type(error).__name__}: {error}"[:200]
        if cause is not None:
            outcome.detail += f" ({type(cause).__name__}: {cause})"[:200]
    outcome.ended = clock()
    return outcome


class Load:
    """
    ``clients`` threads, each sending one request at a time until stopped,
    with the key of the period the request starts in.

    :param key_for: the API key (its name and secret) for a request started
        ``at`` seconds into the load.
    """

    def __init__(
        self,
        base_url: str,
        key_for: Callable[[float], tuple[str, str]],
        *,
        clients: int,
        stream_share: float,
        think: float,
        seed: int,
    ) -> None:
        self.base_url = base_url
        self.key_for = key_for
        self.clients = clients
        self.stream_share = stream_share
        self.think = think
        self.seed = seed
        self.outcomes: list[Outcome] = []
        self.started_at = 0.0
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()
        self._running = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sdk: dict[str, openai.OpenAI] = {}

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.started_at

    def sdk(self, token: str) -> openai.OpenAI:
        with self._lock:
            if token not in self._sdk:
                self._sdk[token] = client_for(self.base_url, token)
            return self._sdk[token]

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._running.set()
        for index in range(self.clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                break
            at = self.now()
            name, token = self.key_for(at)
            outcome = Outcome(key=name, stream=rng.random() < self.stream_share, started=at)
            with self._lock:
                self._in_flight += 1
            try:
                send(self.sdk(token), outcome, self.now)
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self.outcomes.append(outcome)
            self._stop.wait(rng.uniform(0, self.think))

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def _drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.in_flight == 0

    def pause(self, timeout: float = 60.0) -> bool:
        """No new requests; wait for those under way.  False if some never ended."""
        self._running.clear()
        return self._drained(timeout)

    def resume(self) -> None:
        self._running.set()

    def stop(self, timeout: float = 90.0) -> None:
        """Stop sending; wait for the requests under way to end."""
        self._stop.set()
        self._running.set()
        for thread in self._threads:
            thread.join(timeout)
        if any(thread.is_alive() for thread in self._threads):
            log("warning: some clients did not finish their last request")
        for sdk in self._sdk.values():
            sdk.close()


def drain_streams(
    base_url: str,
    key: tuple[str, str],
    count: int,
    clock: Callable[[], float],
    under_way: Callable[[], None],
) -> list[Outcome]:
    """
    ``count`` streams at once; once each has its first chunk, ``under_way``
    is called (it sends ``SIGTERM``) while they go on.  Returns how each
    ended.
    """
    name, token = key
    sdk = client_for(base_url, token)
    outcomes = [Outcome(key=name, stream=True, started=clock()) for _ in range(count)]
    threads = [
        threading.Thread(target=send, args=(sdk, outcome, clock), daemon=True)
        for outcome in outcomes
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while any(o.first_chunk is None and not o.ended for o in outcomes):
        if time.monotonic() > deadline:
            log("warning: not every drain stream started within 30 s")
            break
        time.sleep(0.005)
    under_way()
    for thread in threads:
        thread.join(TIMEOUT + 5)
    sdk.close()
    return outcomes


def same_answers(outcomes: list[Outcome], expected: Mapping[str, Any]) -> list[Outcome]:
    """
    Mark the successful answers that differ from ``expected`` (content and
    usage, taken from the first answer): every request asked the same thing
    of a deterministic model.
    """
    wrong = []
    for outcome in outcomes:
        if not outcome.ok:
            continue
        seen = {
            "content": outcome.content,
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
        }
        if seen != dict(expected):
            outcome.failure, outcome.detail = "wrong answer", repr(seen)[:200]
            wrong.append(outcome)
    return wrong
