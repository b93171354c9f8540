"""
What a fake has seen, for tests (and soaks) to assert on: how its
generations started and ended, the tokens its answers reported, and the
requests it received.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

SeenT = TypeVar("SeenT")


@dataclass
class TokenCount:
    """
    Tokens a fake's answers reported for one model.
    """

    prompt: int = 0
    completion: int = 0

    def to_json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion}


@dataclass
class ServerStats(Generic[SeenT]):
    """
    Counters and the request log.

    :ivar started: generations that got past validation and began
        producing output (stalled ones included).
    :ivar completed: generations that ended normally.
    :ivar aborted: generations stopped because the client went away.
    :ivar failed: generations that ended in an error.
    :ivar requests: what the fake received, in arrival order: what a proxy
        actually sent upstream (each fake decides what it keeps).
    :ivar tokens: by model name as the answers give it, the usage every
        answer reported (a completed generation's prompt and completion
        tokens, an embedding's prompt tokens), whether or not the client
        asked to see it: what a proxy should have charged.
    """

    started: int = 0
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    requests: list[SeenT] = field(default_factory=list)
    tokens: dict[str, TokenCount] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        """
        Generations started and not yet ended.
        """
        return self.started - self.completed - self.aborted - self.failed

    def count_tokens(self, model: str, prompt: int, completion: int = 0) -> None:
        """
        Add an answer's reported usage.
        """
        count = self.tokens.setdefault(model, TokenCount())
        count.prompt += prompt
        count.completion += completion

    @property
    def prompt_tokens(self) -> int:
        return sum(count.prompt for count in self.tokens.values())

    @property
    def completion_tokens(self) -> int:
        return sum(count.completion for count in self.tokens.values())

    def counters(self) -> dict[str, Any]:
        """
        The counters as served by ``GET /_fake/stats``.
        """
        return {
            "started": self.started,
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "requests": len(self.requests),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_by_model": {name: count.to_json() for name, count in self.tokens.items()},
        }

    def reset(self, in_flight: int = 0) -> None:
        """
        Zero everything in place (tests may hold a reference), keeping the
        generations still running counted as started so ``in_flight`` stays
        right when they end.
        """
        self.started, self.completed, self.aborted, self.failed = in_flight, 0, 0, 0
        self.requests.clear()
        self.tokens.clear()
