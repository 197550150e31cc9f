"""ARI mode: the Stasis application ``guard`` and the small ARI client it runs on.

``client`` speaks ARI (REST with typed errors, the events WebSocket with reconnection);
``app`` turns ``StasisStart`` into an engine decision and ``ChannelDestroyed`` into a settle;
``testing`` is a local ARI stand-in for tests and the benchmark. The dialplan side is
``dialplan/extensions_guard_ari.conf``.
"""

from __future__ import annotations

from guard.ari.app import AriAppSettings, GuardStasisApp, RefuseMode
from guard.ari.client import (
    HANGUP_REASONS,
    AriAuthError,
    AriBadRequest,
    AriClient,
    AriConflict,
    AriError,
    AriNotFound,
    AriTimeout,
    AriUnavailable,
    Backoff,
    ChannelNotFound,
)

__all__ = [
    "HANGUP_REASONS",
    "AriAppSettings",
    "AriAuthError",
    "AriBadRequest",
    "AriClient",
    "AriConflict",
    "AriError",
    "AriNotFound",
    "AriTimeout",
    "AriUnavailable",
    "Backoff",
    "ChannelNotFound",
    "GuardStasisApp",
    "RefuseMode",
]
