"""
Open the state store a configuration names.
"""

from __future__ import annotations

import os
from typing import Any

from oproxy.config import StateConfig, default_state_path
from oproxy.resp import RedisClient
from oproxy.state.base import IStateStore
from oproxy.state.redis import RedisStateStore
from oproxy.state.sqlite import SQLiteStore


def open_store(config: StateConfig, reactor: Any) -> IStateStore:
    """
    The store ``config`` names: SQLite (the default, at ``config.path`` or
    the default state path) or Redis.
    """
    if config.backend == "redis":
        client = RedisClient(
            reactor,
            config.url,
            connect_timeout=config.timeout,
            command_timeout=config.timeout,
        )
        return RedisStateStore(client, namespace=config.namespace)
    path = config.path or default_state_path(os.environ)
    return SQLiteStore(path, busy_timeout=config.timeout)
