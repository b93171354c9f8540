"""
``POST /v1/completions``: the legacy text completions API.

A list of prompts and ``n`` choices run as separate generations, bounded
and joined by :mod:`oproxy.api.choices`; they are checked (and the request
refused with a 400) before the caller's limits are charged.
"""

from __future__ import annotations

from oproxy.api.choices import answer_generations
from oproxy.api.scope import Scope


async def create(scope: Scope) -> bytes | None:
    return await answer_generations(scope, "completions")
