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
    #: Interval mode: reserve this many seconds at a time (see ``Reservation.cap_seconds``);
    #: ``None`` reserves the whole call.
    slice_seconds: int | None = None


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
    #: Settled spend of the extension and of the tenant today, before this call (what the spend
    #: alerts compare to the daily limits); 0 when the script stopped before reading them.
    ext_spent: int = 0
    tenant_spent: int = 0
    #: Interval mode: ``max_seconds`` is the first slice, and the call may last ``cap_seconds``
    #: as long as ``extend_slice`` extends it. 0 when the whole call was reserved.
    cap_seconds: int = 0

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
    #: Interval reservations (see ``SliceCall``): the slice added at each extension and the
    #: longest the call may last; both 0 for a call reserved whole.
    slice_seconds: int = 0
    cap_seconds: int = 0


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
class IpBlock:
    """A blocked source IP (global: every tenant refuses it with ``ip_blocked``)."""

    ip: str
    #: Epoch seconds when the block lifts by itself; ``None``: blocked until an admin unblocks it.
    until: float | None
    #: Why: ``too_many_refusals``, ``scanner_user_agent`` or an admin's reason.
    reason: str
    #: Epoch seconds.
    at: float
    #: ``guard`` for an automatic block, else the admin who blocked it.
    by: str = "guard"
    #: Refusals in the window when it was blocked (0 for an admin's block).
    refusals: int = 0

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now


@dataclass(frozen=True, slots=True)
class BlockRule:
    """When a refused attempt blocks its source IP, atomically with counting it.

    ``threshold`` refusals from the IP inside the window block it for ``seconds`` (0: never);
    ``immediate`` blocks it at once and until an admin unblocks it (a scanner User-Agent).
    """

    threshold: int = 0
    seconds: int = 3600
    immediate: bool = False


@dataclass(frozen=True, slots=True)
class RefusalCounts:
    """Refused attempts in the window (10 minutes by default), counting the one just recorded."""

    #: From this source IP, across all tenants.
    ip: int
    #: From this source IP with the same reason.
    ip_same_reason: int
    #: Of this extension.
    extension: int
    #: The IP's block, if it is blocked (by this refusal or before).
    block: IpBlock | None = None
    #: This very refusal blocked the IP (true for exactly one refusal, across all guards).
    blocked_now: bool = False


class ThreatKind(StrEnum):
    IP = "ip"
    NUMBER = "number"


@dataclass(frozen=True, slots=True)
class ThreatList:
    """One imported threat list: bad source IPs/networks, or fraud number prefixes."""

    name: str
    kind: ThreatKind
    entries: int
    #: Epoch seconds.
    imported_at: float
    source: str = ""
    by: str = ""


@dataclass(frozen=True, slots=True)
class HourlySpend:
    """What a tenant (and each extension) spent in each hour of one of its days.

    Hours are 0-23 of the tenant's wall clock; hours without spend are absent. The hours of a
    day add up to the day's ``spent``, except for spend booked before the buckets existed.
    """

    tenant: str
    day: str
    total: dict[int, int]
    extensions: dict[str, dict[int, int]]


class SliceOutcome(StrEnum):
    """What ``extend_slice`` did, besides refusing with a reason code (``Reason`` values such as
    ``daily_limit_tenant`` or ``extension_locked``)."""

    EXTENDED = "extended"
    #: The slice no longer ends when the caller thought: another guard extended or cut it.
    STALE = "stale"
    #: The reservation is closed (settled or swept): nothing to extend.
    GONE = "gone"
    #: Refused: the call reached the longest it may last.
    CAP_REACHED = "cap_reached"
    #: Refused: asked after the slice had ended (the extender was late); the call must be cut.
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class SliceCall:
    """A live call reserved in interval mode, as the extender reads it (``due_slices``)."""

    tenant: str
    call_id: str
    extension: str
    #: Epoch seconds of the reservation.
    started: float
    #: Seconds the money reserved so far buys, counted from ``started``.
    max_seconds: int
    reserved: int
    slice_seconds: int
    cap_seconds: int
    #: Epoch milliseconds when the money reserved so far runs out (``started + max_seconds``);
    #: exact, since an extension or a cut must name it.
    ends_ms: int
    #: Why the reservation may no longer be extended (the call is cut at ``ends_ms``); empty
    #: while it may.
    final: str = ""


@dataclass(frozen=True, slots=True)
class SliceExtension:
    """The ledger's answer to ``extend_slice``: the outcome and the reservation afterwards."""

    outcome: str
    max_seconds: int
    ends_ms: int
    reserved: int

    @property
    def extended(self) -> bool:
        return self.outcome == SliceOutcome.EXTENDED

    @property
    def refused(self) -> bool:
        """The reservation may no longer grow: the call is to be cut when its slice ends."""
        return self.outcome not in (SliceOutcome.EXTENDED, SliceOutcome.STALE, SliceOutcome.GONE)
