"""Values exchanged with the ledger: what a reservation asks for and what the ledger answers.

The ledger is the only component that holds money state. These types are its whole vocabulary
with the engine, so that the engine never sees a Redis key and the ledger never sees a policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from guard.domain import Rate, Reason, UaLockMode


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """One call asking for budget and a call slot. ``None`` limits mean "no limit"."""

    tenant: str
    extension: str
    call_id: str
    #: The tenant's calendar day (``YYYYMMDD``) in the tenant's time zone at ``now``.
    day: str
    #: Epoch seconds.
    now: float
    rate: Rate
    number: str
    ext_daily_limit: int | None
    tenant_daily_limit: int | None
    ext_concurrent_limit: int | None
    tenant_concurrent_limit: int | None
    #: Longest call to reserve for (seconds), before the budget is considered.
    max_call_seconds: int
    #: Extra seconds after ``max_seconds`` before the sweeper charges a reservation in full.
    grace_seconds: int = 60
    ua_mode: UaLockMode = UaLockMode.OFF
    user_agent: str = ""
    source_ip: str = ""
    channel: str = ""


@dataclass(frozen=True, slots=True)
class Reservation:
    """The ledger's answer to a ``ReserveRequest``.

    ``reason`` is ``Reason.ALLOWED`` when budget and a slot were reserved, otherwise the refusal
    (daily/concurrent limit, ``extension_locked``, ``user_agent_mismatch``). ``existing`` is true
    when the same call id had already reserved (an idempotent retry returned the first answer).
    ``locked_now`` is true when this very request locked the extension (learned UA mismatch).
    """

    reason: Reason
    reserved: int = 0
    max_seconds: int = 0
    existing: bool = False
    locked_now: bool = False

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED


class SettleOutcome(StrEnum):
    SETTLED = "settled"
    ALREADY_SETTLED = "already_settled"
    UNKNOWN_CALL = "unknown_call"
    #: The sweeper had charged the call in full; the late settle corrected it to the real cost.
    SETTLED_AFTER_SWEEP = "settled_after_sweep"


@dataclass(frozen=True, slots=True)
class SettleResult:
    outcome: SettleOutcome
    tenant: str
    call_id: str
    extension: str = ""
    cost: int = 0
    reserved: int = 0
    #: The real cost exceeded the reservation: the call outlived its limit (charged in full).
    over_reservation: bool = False


@dataclass(frozen=True, slots=True)
class SweptCall:
    tenant: str
    call_id: str
    extension: str
    charged: int
    deadline: float


@dataclass(frozen=True, slots=True)
class LiveCall:
    tenant: str
    call_id: str
    extension: str
    number: str
    destination: str
    rate_per_minute: int
    started: float
    reserved: int
    max_seconds: int
    deadline: float
    channel: str = ""


@dataclass(frozen=True, slots=True)
class SpendCounters:
    """Today's money for one tenant (or one extension): settled spend, open reservations, calls."""

    spent: int = 0
    reserved: int = 0
    live_calls: int = 0


@dataclass(frozen=True, slots=True)
class TenantCounters:
    tenant: str
    day: str
    total: SpendCounters
    extensions: dict[str, SpendCounters]


@dataclass(frozen=True, slots=True)
class ExtensionState:
    """An extension's runtime state in the ledger: the learned User-Agent and the lock."""

    #: ``None`` until a User-Agent is learned (``ua_mode`` learn).
    learned_user_agent: str | None = None
    locked: bool = False
    lock_reason: str = ""
    #: Epoch seconds.
    locked_at: float | None = None


@dataclass(frozen=True, slots=True)
class RefusalCounts:
    """Refused attempts in the last 10 minutes, after counting the one just recorded."""

    #: From this source IP, across all tenants.
    ip: int
    #: From this source IP with the same reason.
    ip_same_reason: int
    #: Of this extension.
    extension: int
