"""The FastAGI adapter: Asterisk's ``AGI(agi://…)`` calls into the engine.

``protocol`` is the wire format (no I/O), ``server`` the asyncio server and its router,
``routes`` Guard's ``authorize``/``settle`` handlers, ``contract`` the channel variables the
dialplan reads, and ``testing`` an Asterisk emulator that replays recorded sessions.
"""

from __future__ import annotations

from guard.agi.protocol import AGIProtocolError, AGIReply
from guard.agi.routes import Authorizer, GuardRoutes
from guard.agi.server import AGIConnectionError, AGIRequest, AGIServer

__all__ = [
    "AGIConnectionError",
    "AGIProtocolError",
    "AGIReply",
    "AGIRequest",
    "AGIServer",
    "Authorizer",
    "GuardRoutes",
]
