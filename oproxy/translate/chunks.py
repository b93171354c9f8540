"""
A chat stream as another API's stream: ``chat.completion.chunk`` objects in,
OpenAI's Responses events or Anthropic's Messages events out.

Both translations read a chat stream the same way: the first choice's
deltas, in order; the usage, which comes with the last chunk; the finish
reason; and, once the chunks end, the events that close the answer.  This
base class is that reading; what each API makes of it is its subclass's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any


class ChunkTranslator(ABC):
    """
    Chat chunks in, events out, one chunk at a time (:meth:`feed`), then the
    closing events (:meth:`finish`); :meth:`events` does both over a stream.

    :ivar started: whether the opening events (:meth:`start`) were given.
    """

    def __init__(self) -> None:
        self.started = False

    @abstractmethod
    def start(self) -> list[dict[str, Any]]:
        """The events that open the stream; sets :attr:`started`."""

    @abstractmethod
    def finish(self) -> list[dict[str, Any]]:
        """The events that close the stream, once the chunks have ended."""

    @abstractmethod
    def _delta(self, delta: Mapping[str, Any], events: list[dict[str, Any]]) -> None:
        """Add the events for one delta of the first choice to ``events``."""

    @abstractmethod
    def _note_usage(self, usage: object) -> None:
        """Note a chunk's ``usage`` (not null)."""

    @abstractmethod
    def _note_finish(self, choice: Mapping[str, Any]) -> None:
        """Note the first choice's end (its ``finish_reason`` is not null)."""

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The events for one chat chunk (often one, sometimes none or several)."""
        events = [] if self.started else self.start()
        if chunk.get("usage") is not None:
            self._note_usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                self._delta(delta, events)
            if choice.get("finish_reason") is not None:
                self._note_finish(choice)
        return events

    async def events(
        self, chunks: AsyncGenerator[dict[str, Any], None]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """
        The events for a whole chat stream.

        A chat stream without a single chunk gives no events either, so the
        relay reports it as the backend's failure rather than an answer.
        """
        seen = False
        async with aclosing(chunks):
            async for chunk in chunks:
                seen = True
                for event in self.feed(chunk):
                    yield event
        if seen:
            for event in self.finish():
                yield event
