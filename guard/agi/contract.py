"""The channel variables of the dialplan contract, and how a refusal is written into them.

``dialplan/extensions_guard.conf`` reads these names: renaming one breaks every installed
dialplan. The dialplan lets a call out only when ``GUARD_RESULT`` is exactly ``ALLOW`` and
``GUARD_MAX_SECONDS`` a positive integer, so every writer here sets ``GUARD_RESULT`` last: a
session cut midway never leaves ``ALLOW`` without its limit.
"""

from __future__ import annotations

from guard.agi.protocol import set_variable, verbose
from guard.domain import Reason, Result

RESULT = "GUARD_RESULT"
REASON = "GUARD_REASON"
MAX_SECONDS = "GUARD_MAX_SECONDS"
TENANT = "GUARD_TENANT"
DEST = "GUARD_DEST"
CLASS = "GUARD_CLASS"
SETTLED = "GUARD_SETTLED"
#: Set only for an interval reservation: ``interval``, and the call's cap in seconds, which the
#: dialplan dials with instead of ``GUARD_MAX_SECONDS`` (the first slice: a dialplan that does
#: not know interval mode cuts the call at its slice, which is safe).
MODE = "GUARD_MODE"
CAP_SECONDS = "GUARD_CAP_SECONDS"
INTERVAL = "interval"

#: ``GUARD_REASON`` when the server is at its session limit.
OVERLOADED = Reason.OVERLOADED.value


def refusal_commands(reason: str, note: str) -> list[str]:
    """A ``VERBOSE`` note for the Asterisk log, then a DENY with ``reason`` (result last)."""
    return [
        verbose(note),
        set_variable(REASON, reason),
        set_variable(MAX_SECONDS, 0),
        set_variable(RESULT, Result.DENY.value),
    ]
