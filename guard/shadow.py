"""Shadow mode: Guard judges a call as usual, then lets it go, and records what it would have done.

A tenant in shadow mode (or one extension of it) is decided by the same checks and limits as an
enforced one, but its limits are judged on *shadow counters*: a second ledger under the key
prefix ``<prefix>-shadow`` on the same store, where its calls reserve and settle instead of the
live counters. A call Guard would have refused is allowed with the tenant's ``max_call_seconds``
(``Reason.SHADOW``) and raised as a ``shadow_refused`` event (log, audit table, alerts). A call
Guard would have allowed is allowed with the tenant's ``max_call_seconds`` too: shadow mode
never shortens a call either.

Never shadowed, whatever the mode:

- emergency calls (always allowed anyway);
- ``ALWAYS_ENFORCED``: explicit stops, not limits under trial: a locked extension (locked by an
  admin, or by a changed User-Agent while enforced), a disabled tenant, a broken request;
- ``PERIMETER_REASONS`` while the tenant enforces its perimeter in shadow mode (the default):
  what no customer's own traffic looks like: a scanner User-Agent, a blocked source IP, a
  source IP or a dialed number on a threat list. Source-network and country allow-lists, the
  User-Agent lock, time windows, destinations, classes, rate caps and the daily and concurrent
  limits are all shadowed: those are what an operator tries out.

Shadow refusals are not counted towards IP blocks (a customer trying out a tight limit must not
get its own PBX blocked). Pure: no I/O here; the engine does the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from guard.domain import Decision, Reason, Result
from guard.snapshot import ExtensionConfig, TenantConfig

#: Appended to the live key prefix for the shadow counters (``guard`` → ``guard-shadow``).
SHADOW_SUFFIX: Final = "-shadow"

#: Refused in shadow mode too while the tenant enforces its perimeter (the default).
PERIMETER_REASONS: Final = frozenset(
    {
        Reason.SCANNER_USER_AGENT,
        Reason.IP_BLOCKED,
        Reason.THREAT_LIST,
        Reason.THREAT_NUMBER,
    }
)

#: Refused in shadow mode whatever the perimeter setting.
ALWAYS_ENFORCED: Final = frozenset(
    {Reason.EXTENSION_LOCKED, Reason.UNKNOWN_TENANT, Reason.BAD_REQUEST}
)


def shadow_prefix(prefix: str) -> str:
    """The key prefix of the shadow counters beside the live ones under ``prefix``."""
    return prefix + SHADOW_SUFFIX


def in_shadow(tenant: TenantConfig | None, extension: ExtensionConfig | None) -> bool:
    """Whether calls of ``extension`` of ``tenant`` are judged in shadow mode."""
    return tenant is not None and (tenant.shadow or (extension is not None and extension.shadow))


def enforced_in_shadow(reason: Reason, tenant: TenantConfig) -> bool:
    """Whether a refusal for ``reason`` stands although the call is in shadow mode."""
    return reason in ALWAYS_ENFORCED or (
        tenant.shadow_enforce_perimeter and reason in PERIMETER_REASONS
    )


def let_go(decision: Decision, tenant: TenantConfig) -> Decision:
    """What a call in shadow mode gets instead of ``decision``: it goes out for the tenant's
    longest call; an allowed one is marked ``detail="shadow"``, a would-be refusal becomes
    ``Reason.SHADOW`` with the reason as detail."""
    if decision.reason is Reason.ALLOWED:
        return dataclasses.replace(decision, max_seconds=tenant.max_call_seconds, detail="shadow")
    return dataclasses.replace(
        decision,
        result=Result.ALLOW,
        reason=Reason.SHADOW,
        max_seconds=tenant.max_call_seconds,
        detail=decision.reason.value,
    )


def shadowed(decision: Decision, tenant: TenantConfig) -> Decision:
    """What a call in shadow mode gets for ``decision``, the verdict of the checks or of a lock in
    the live counters: the refusal stands if shadow mode enforces its reason, else it is let go.

    The verdicts of the shadow counters (their lock, learned User-Agent, limits, or their being
    unreachable) are always let go (``let_go``): they are what is tried out.
    """
    return decision if enforced_in_shadow(decision.reason, tenant) else let_go(decision, tenant)
