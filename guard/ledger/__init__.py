"""The spend ledger: the one component that holds money state (reservations, spend, live calls).

``ledger_from_url`` builds a ``RedisLedger`` for a store URL (``redis://``, ``rediss://``,
``unix://``, ``redis+sentinel://``, ``redis+cluster://``, ``memory://``); ``guard.ledger.types``
is the whole vocabulary it shares with the engine; ``guard.ledger.keys`` documents the Redis key
schema.
"""

from __future__ import annotations

from guard.ledger.redis_ledger import DEFAULT_TIMEOUT, RedisLedger
from guard.ledger.storage import ledger_from_url
from guard.settings import mask_url

__all__ = ["DEFAULT_TIMEOUT", "RedisLedger", "ledger_from_url", "mask_url"]
