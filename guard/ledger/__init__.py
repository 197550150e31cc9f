"""The spend ledger: the one component that holds money state (reservations, spend, live calls).

``ledger_from_url`` builds a ``RedisLedger`` for a store URL (``redis://``, ``rediss://``,
``unix://``, ``redis+sentinel://``, ``redis+cluster://``, ``memory://``); ``guard.ledger.types``
is the whole vocabulary it shares with the engine; ``guard.ledger.keys`` documents the Redis key
schema.

The names below are imported on first use (PEP 562), so that importing ``guard.ledger.types``
alone (as the admin CLI does for its option choices) does not load the Redis client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guard.ledger.redis_ledger import DEFAULT_TIMEOUT, RedisLedger
    from guard.ledger.storage import ledger_from_url
    from guard.settings import mask_url

__all__ = ["DEFAULT_TIMEOUT", "RedisLedger", "ledger_from_url", "mask_url"]

#: Where each name of ``__all__`` is defined.
_SOURCES = {
    "DEFAULT_TIMEOUT": "guard.ledger.redis_ledger",
    "RedisLedger": "guard.ledger.redis_ledger",
    "ledger_from_url": "guard.ledger.storage",
    "mask_url": "guard.settings",
}


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
