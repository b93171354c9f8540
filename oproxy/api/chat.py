"""
``POST /v1/chat/completions``.

``n`` choices run as separate generations, bounded and joined by
:mod:`oproxy.api.choices`; ``n`` is checked (and the request refused with
a 400) before the caller's limits are charged.
"""

from __future__ import annotations

from oproxy.api.choices import answer_generations
from oproxy.api.scope import Scope
from oproxy.translate.chat import remote_image_urls


async def create(scope: Scope) -> bytes | None:
    return await answer_generations(scope, "chat", image_urls=remote_image_urls)
