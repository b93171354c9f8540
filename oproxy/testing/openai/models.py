"""
The models the fake OpenAI-compatible server serves, some of which
misbehave on purpose (see :data:`DEFAULT_OPENAI_MODELS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

BROKEN_MESSAGE: Final = "The model crashed while generating (fake failure)."


@dataclass(frozen=True)
class FakeOpenAIModel:
    """
    One model the fake serves.

    :ivar token_delay: seconds between streamed chunks (at least).
    :ivar answer_tokens: answers are padded to this many tokens (`` token12``
        and so on), so that a slow model's stream lasts.
    :ivar stall_after: chunks sent before the model stops for good (0: not
        even the headers); ``None``: it never stalls.
    :ivar broken_after: chunks sent before it fails with an in-band error
        event (a 500 when not streamed); ``None``: it never fails.
    :ivar dimensions: the length of its embeddings.
    """

    id: str
    owned_by: str = "fake"
    created: int = 1_700_000_000
    token_delay: float = 0.0
    answer_tokens: int = 0
    stall_after: int | None = None
    broken_after: int | None = None
    dimensions: int = 16

    def entry(self) -> dict[str, Any]:
        """The model object of ``/v1/models``."""
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


DEFAULT_OPENAI_MODELS: Final = (
    FakeOpenAIModel("gpt-fake"),
    FakeOpenAIModel("org/fake-7b-instruct", owned_by="org"),
    FakeOpenAIModel("embed-fake", dimensions=8),
    FakeOpenAIModel("slow", token_delay=0.05, answer_tokens=2000),
    FakeOpenAIModel("stall", stall_after=0),
    FakeOpenAIModel("stall-midway", stall_after=2),
    FakeOpenAIModel("broken", broken_after=3),
)
