"""
The ``responses:`` section: how long OpenAI's Responses API keeps what it
stores, and how much.
"""

from __future__ import annotations

import attrs

from oproxy.config.values import MIB, ByteSize, Seconds

#: OpenAI keeps a stored response for 30 days.
THIRTY_DAYS = 30 * 86400.0


@attrs.frozen
class ResponsesConfig:
    """
    Responses created with ``store: true`` (OpenAI's default), kept in the
    state store so that ``GET /v1/responses/{id}`` and
    ``previous_response_id`` find them.

    :ivar store: whether ``store: true`` is honoured; off, nothing is kept
        and every response says ``store: false``.
    :ivar ttl: seconds a response is kept; one that a later response is
        chained onto is kept as long as that one.
    :ivar max_bytes: the largest response (with its input) kept; a larger
        one is answered but not kept, and says ``store: false``.
    """

    store: bool = True
    ttl: Seconds = THIRTY_DAYS
    max_bytes: ByteSize = 4 * MIB
