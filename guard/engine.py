"""The decision engine: one call attempt in, one ``Decision`` out; settle and sweep the money.

``authorize`` reads the in-memory snapshot, runs the pure policy checks (rating included), and
only then makes ONE ledger call that atomically reserves budget and a call slot. No SQL here.
Every refusal, lock, block, spend warning, orphan settle and swept reservation is emitted as an
event. When the ledger is unreachable the tenant's fail mode decides; emergency numbers are
allowed whatever happens.

The perimeter (``guard.perimeter``) comes first: a blocked source IP is refused with
``ip_blocked`` before any other check, from in-process state (no Redis round trip on the allowed
path), and is not counted again. Every other refusal is counted in the background; the count
blocks the IP atomically once it passes the threshold (a scanner User-Agent at once), and that
refusal emits the one ``ip_blocked`` event of the block.

Shadow mode (``guard.shadow``): a call of a tenant or extension in shadow mode is judged the same
way, but on the shadow counters (``shadow_ledger``), and let go: a would-be refusal becomes
``Reason.SHADOW`` and a ``shadow_refused`` event, except the refusals that shadow mode enforces.
``settle`` finds the ledger that holds the call, so adapters need not know the mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from guard.aio import honour_cancellation
from guard.domain import (
    FAIL_OPEN_CLASSES,
    CallAttempt,
    CheckOutcome,
    Decision,
    FailMode,
    Reason,
    ReservationMode,
    Result,
    UaLockMode,
)
from guard.errors import StorageError
from guard.events import Event, EventBus, EventKind
from guard.ledger.protocol import Ledger
from guard.ledger.types import (
    ExtensionState,
    IpBlock,
    Reservation,
    ReserveRequest,
    SettleOutcome,
    SettleResult,
    SpendCounters,
    SweptCall,
    TenantCounters,
)
from guard.logs import log_fields
from guard.money import MAX_CALL_SECONDS, max_affordable_seconds
from guard.perimeter import Perimeter
from guard.policy import PolicyResult, evaluate, parse_source_ip
from guard.rating import is_emergency_number
from guard.schedule import tenant_day
from guard.shadow import in_shadow, let_go, shadowed
from guard.snapshot import ExtensionConfig, Snapshot, TenantConfig

log = logging.getLogger("guard.engine")

Clock = Callable[[], float]
#: Spend warnings already emitted by this process (tenant, extension, day) are not emitted
#: again; past this many the memory is cleared (a new day's keys differ anyway).
_SPEND_SEEN_MAX = 100_000
#: Default length of the refusal windows without a perimeter (see ``RedisLedger``).
_WINDOW_MINUTES = 10


@dataclass(frozen=True, slots=True)
class EngineSettings:
    grace_seconds: int = 60
    fail_open_max_seconds: int = 300
    emergency_max_seconds: int = 14_400
    #: Settled spend at this share of a daily limit (percent) emits ``spend_warning``.
    spend_warn_percent: int = 80


@dataclass(frozen=True, slots=True)
class Preview:
    """What ``authorize`` would decide now, computed without reserving anything."""

    #: What ``authorize`` would return (but the reservation): in shadow mode, the call let go
    #: (``Reason.SHADOW`` for a would-be refusal) unless the refusal stands.
    decision: Decision
    policy: PolicyResult
    tenant_today: SpendCounters | None = None
    extension_today: SpendCounters | None = None
    store_error: str = ""
    #: The ledger's checks before the limits, as read: the runtime lock, then the learned
    #: User-Agent; in shadow mode the live lock, then the shadow counters' (``shadow_lock``).
    runtime: tuple[CheckOutcome, ...] = ()
    #: The verdict of the limits alone on today's counters (the fail mode's when they could not
    #: be read); ``None`` when the checks refused the call first.
    limits: Decision | None = None
    #: In shadow mode, the verdict if enforced (what ``decision`` was made of); else ``None``.
    enforced: Decision | None = None

    @property
    def shadow(self) -> bool:
        """The call is judged in shadow mode; its counters are the shadow ones."""
        return self.enforced is not None


def _remaining(limit: int | None, counters: SpendCounters) -> int | None:
    return None if limit is None else limit - counters.spent - counters.reserved


def _runtime_outcome(
    name: str, state: ExtensionState, extension: ExtensionConfig, user_agent: str, *, learn: bool
) -> CheckOutcome:
    """The ledger's checks before the limits on ``state``, in the order ``reserve`` runs them:
    the lock, then in ``learn`` mode the learned User-Agent (a different one would lock)."""
    if state.locked:
        reason = state.lock_reason or "no reason given"
        return CheckOutcome(name, False, Reason.EXTENSION_LOCKED, f"locked: {reason}")
    if not learn or extension.ua_mode is not UaLockMode.LEARN:
        return CheckOutcome(name, True, None, "not locked")
    learned = state.learned_user_agent
    if learned is None:
        return CheckOutcome(name, True, None, "nothing learned yet: would learn it")
    if learned != user_agent:
        return CheckOutcome(
            name,
            False,
            Reason.USER_AGENT_MISMATCH,
            f"differs from the learned User-Agent {learned!r}: would lock the extension",
        )
    return CheckOutcome(name, True, None, "matches the learned User-Agent")


def _limits(
    attempt: CallAttempt,
    policy: PolicyResult,
    number: str,
    counters: TenantCounters,
    ext_today: SpendCounters,
) -> Decision:
    """The limits' verdict on today's counters, as ``reserve`` judges them (concurrent calls,
    then the daily budgets), and the longest call the budget allows."""
    tenant, extension, rate = policy.tenant, policy.extension, policy.rate
    assert tenant is not None and extension is not None and rate is not None
    reason = Reason.ALLOWED
    if (
        extension.concurrent_limit is not None
        and ext_today.live_calls >= extension.concurrent_limit
    ):
        reason = Reason.CONCURRENT_LIMIT_EXTENSION
    elif (
        tenant.concurrent_limit is not None and counters.total.live_calls >= tenant.concurrent_limit
    ):
        reason = Reason.CONCURRENT_LIMIT_TENANT
    ext_left = _remaining(extension.daily_limit, ext_today)
    tenant_left = _remaining(tenant.daily_limit, counters.total)
    budgets = [left for left in (ext_left, tenant_left) if left is not None]
    budget = min(budgets) if budgets else None
    if budget is None:
        seconds = tenant.max_call_seconds
    else:
        seconds = max_affordable_seconds(rate, budget, tenant.max_call_seconds)
    if reason is Reason.ALLOWED and seconds == 0:
        binding_ext = ext_left is not None and (tenant_left is None or ext_left <= tenant_left)
        reason = Reason.DAILY_LIMIT_EXTENSION if binding_ext else Reason.DAILY_LIMIT_TENANT
    result = Result.ALLOW if reason is Reason.ALLOWED else Result.DENY
    return Decision(
        result,
        reason,
        seconds if result is Result.ALLOW else 0,
        attempt.call_id,
        number=number,
        destination=rate,
    )


class SnapshotHolder:
    """Holds the current snapshot; a reload that fails keeps the old one and says so."""

    def __init__(self, snapshot: Snapshot, clock: Clock = time.time) -> None:
        self.current = snapshot
        self.last_error: str = ""
        self.last_error_at: float = 0.0
        self.clock = clock

    async def reload_if_changed(
        self, build: Callable[[], Snapshot], version: Callable[[], Awaitable[int]]
    ) -> bool:
        try:
            wanted = await version()
            expires = self.current.expires_at
            if wanted == self.current.version and (expires is None or self.clock() < expires):
                return False
            snapshot = await asyncio.to_thread(build)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            self.last_error_at = time.time()
            log.error(
                "snapshot reload failed; the previous snapshot keeps serving",
                extra=log_fields(version=self.current.version, error=self.last_error),
            )
            return False
        self.current = snapshot
        self.last_error = ""
        log.info(
            "snapshot reloaded",
            extra=log_fields(
                version=snapshot.version,
                tenants=len(snapshot.tenants),
                extensions=len(snapshot.extensions),
                build_seconds=round(snapshot.build_seconds, 3),
            ),
        )
        return True


class Engine:
    """Authorize and settle calls; the adapters (AGI, ARI, CLI) all come through here."""

    def __init__(
        self,
        snapshots: SnapshotHolder,
        ledger: Ledger,
        events: EventBus,
        settings: EngineSettings | None = None,
        clock: Clock = time.time,
        perimeter: Perimeter | None = None,
        shadow_ledger: Ledger | None = None,
    ) -> None:
        self.snapshots = snapshots
        self.ledger = ledger
        self.events = events
        self.settings = settings or EngineSettings()
        self.clock = clock
        #: Blocks, allow-lists, threat lists and GeoIP; ``None``: no perimeter checks. The
        #: composition root may set it after construction (before serving).
        self.perimeter = perimeter
        #: The shadow counters (``guard.shadow``), set like ``perimeter``. ``None``: calls in
        #: shadow mode are let go unjudged, as when the shadow counters are unreachable.
        self.shadow_ledger = shadow_ledger
        self._background: set[asyncio.Task[None]] = set()
        self._spend_seen: set[tuple[str, str, str]] = set()

    async def authorize(self, attempt: CallAttempt) -> Decision:
        now = self.clock()
        snapshot = self.snapshots.current
        blocked = self._blocked(snapshot, attempt, now)
        if blocked is not None:
            return self._judged(attempt, Reason.IP_BLOCKED, "", blocked, now, count=False)
        extra = self.perimeter.checks if self.perimeter is not None else ()
        policy = evaluate(snapshot, attempt, datetime.fromtimestamp(now, UTC), extra)
        number = policy.number.e164 if policy.number else ""
        if policy.is_emergency:
            return self._emergency(attempt, policy)
        if policy.reason is not None:
            return self._judged(attempt, policy.reason, number, policy, now)
        tenant, extension, rate = policy.tenant, policy.extension, policy.rate
        assert tenant is not None and extension is not None and rate is not None
        day = tenant_day(tenant.timezone, now)
        request = ReserveRequest(
            tenant=tenant.name,
            extension=extension.name,
            call_id=attempt.call_id,
            day=day,
            now=now,
            rate=rate,
            number=number,
            ext_daily_limit=extension.daily_limit,
            tenant_daily_limit=tenant.daily_limit,
            ext_concurrent_limit=extension.concurrent_limit,
            tenant_concurrent_limit=tenant.concurrent_limit,
            max_call_seconds=tenant.max_call_seconds,
            grace_seconds=self.settings.grace_seconds,
            ua_mode=extension.ua_mode,
            user_agent=attempt.user_agent,
            source_ip=str(policy.source_ip or ""),
            channel=attempt.channel,
            slice_seconds=tenant.slice_seconds
            if tenant.reservation_mode is ReservationMode.INTERVAL
            else None,
        )
        if in_shadow(tenant, extension):
            return await self._authorize_shadow(attempt, request, policy, number, now)
        try:
            reservation = await self.ledger.reserve(request)
        except StorageError as exc:
            decision = self._store_unavailable(attempt, policy, number, str(exc))
            if not decision.allowed:
                self._spawn(self._release(tenant.name, attempt.call_id))
            return decision
        if reservation.locked_now:
            self.events.emit(
                Event(
                    EventKind.LOCKED,
                    Reason.USER_AGENT_MISMATCH,
                    tenant.name,
                    extension.name,
                    attempt.source_ip,
                    attempt.call_id,
                    {"ua": attempt.user_agent, "learned": extension.ua_value or ""},
                )
            )
        self._spend_events(attempt, tenant, extension, day, reservation)
        if not reservation.allowed:
            return self._refuse(attempt, reservation.reason, number, policy, now)
        return Decision(
            Result.ALLOW,
            Reason.ALLOWED,
            reservation.max_seconds,
            attempt.call_id,
            number=number,
            destination=rate,
            reserved=reservation.reserved,
            cap_seconds=reservation.cap_seconds,
        )

    async def preview(self, attempt: CallAttempt, now: float | None = None) -> Preview:
        """What ``authorize`` would return at ``now``, from today's counters, read-only.

        For ``guard check``: nothing is reserved, learned or counted. The ledger's checks and the
        limits are judged from a plain read of its state, so a call racing with others may still
        be refused later. A call in shadow mode is decided by the rules of ``authorize`` (the
        same helpers, in the same order); ``enforced`` is then its verdict if enforced.
        """
        moment = self.clock() if now is None else now
        snapshot = self.snapshots.current
        blocked = self._blocked(snapshot, attempt, moment)
        if blocked is not None:
            return self._preview_refusal(attempt, Reason.IP_BLOCKED, "", blocked)
        extra = self.perimeter.checks if self.perimeter is not None else ()
        policy = evaluate(snapshot, attempt, datetime.fromtimestamp(moment, UTC), extra)
        number = policy.number.e164 if policy.number else ""
        if policy.is_emergency:
            return Preview(self._emergency(attempt, policy), policy)
        if policy.reason is not None:
            return self._preview_refusal(attempt, policy.reason, number, policy)
        tenant, extension, rate = policy.tenant, policy.extension, policy.rate
        assert tenant is not None and extension is not None and rate is not None
        shadow = in_shadow(tenant, extension)
        # In shadow mode, as in ``_authorize_shadow``: the live lock first, then the shadow
        # counters, where the learned User-Agent and the lock are judged like the limits.
        runtime: list[CheckOutcome] = []
        live = await self._live_state(tenant.name, extension.name) if shadow else None
        if live is not None:
            ua = attempt.user_agent
            runtime.append(_runtime_outcome("runtime_lock", live, extension, ua, learn=False))
        live_locked = live is not None and live.locked
        ledger = self.shadow_ledger if shadow else self.ledger
        try:
            if ledger is None:
                raise StorageError("no shadow counters in this process")
            counters = await ledger.counters(tenant.name, tenant_day(tenant.timezone, moment))
            state = await ledger.extension_state(tenant.name, extension.name)
        except StorageError as exc:
            store_error = str(exc)
            limits = self._store_unavailable(attempt, policy, number, store_error, emit=False)
            tenant_today = ext_today = None
        else:
            store_error = ""
            tenant_today = counters.total
            ext_today = counters.extensions.get(extension.name, SpendCounters())
            limits = _limits(attempt, policy, number, counters, ext_today)
            if not live_locked:
                name = "shadow_lock" if shadow else "runtime_lock"
                runtime.append(
                    _runtime_outcome(name, state, extension, attempt.user_agent, learn=True)
                )
        refused = next((outcome.reason for outcome in runtime if outcome.reason is not None), None)
        enforced = limits
        if refused is not None:
            enforced = Decision(Result.DENY, refused, 0, attempt.call_id, number, rate)
        decision = enforced
        if shadow:
            decision = shadowed(enforced, tenant) if live_locked else let_go(enforced, tenant)
        return Preview(
            decision,
            policy,
            tenant_today,
            ext_today,
            store_error,
            tuple(runtime),
            limits,
            enforced if shadow else None,
        )

    def _preview_refusal(
        self, attempt: CallAttempt, reason: Reason, number: str, policy: PolicyResult
    ) -> Preview:
        """``preview`` of a call the checks refuse: decided as ``_judged`` decides it."""
        refusal = Decision(Result.DENY, reason, 0, attempt.call_id, number, policy.rate)
        tenant = self._shadow_tenant(attempt, policy)
        if tenant is None:
            return Preview(refusal, policy)
        return Preview(shadowed(refusal, tenant), policy, enforced=refusal)

    def _emergency(self, attempt: CallAttempt, policy: PolicyResult) -> Decision:
        """An emergency call goes out as dialed, whatever else the checks say."""
        return Decision(
            Result.ALLOW,
            Reason.EMERGENCY,
            self.settings.emergency_max_seconds,
            attempt.call_id,
            number=policy.number.dialed if policy.number else attempt.number,
            destination=policy.rate,
        )

    def _shadow_tenant(self, attempt: CallAttempt, policy: PolicyResult) -> TenantConfig | None:
        """The tenant of the call if the call is in shadow mode, else ``None``. The extension is
        looked up by name: the checks may have stopped before it (unknown: the tenant decides)."""
        tenant = policy.tenant
        if tenant is None:
            return None
        extension = self.snapshots.current.extension(tenant.name, attempt.extension)
        return tenant if in_shadow(tenant, extension) else None

    async def _live_state(self, tenant: str, extension: str) -> ExtensionState | None:
        """The extension's state in the live counters; ``None`` when they cannot be read, and a
        call in shadow mode then goes on as if unlocked."""
        try:
            return await self.ledger.extension_state(tenant, extension)
        except StorageError:
            return None

    def _judged(
        self,
        attempt: CallAttempt,
        reason: Reason,
        number: str,
        policy: PolicyResult,
        now: float,
        *,
        count: bool = True,
    ) -> Decision:
        """``_refuse``, unless the call is in shadow mode and shadow mode lets ``reason`` go."""
        tenant = self._shadow_tenant(attempt, policy)
        if tenant is not None:
            refusal = Decision(Result.DENY, reason, 0, attempt.call_id, number, policy.rate)
            decision = shadowed(refusal, tenant)
            if decision.allowed:
                self._emit_shadow_refused(attempt, reason, policy)
                return decision
        return self._refuse(attempt, reason, number, policy, now, count=count)

    async def _authorize_shadow(
        self,
        attempt: CallAttempt,
        request: ReserveRequest,
        policy: PolicyResult,
        number: str,
        now: float,
    ) -> Decision:
        """Judge the limits of a call in shadow mode on the shadow counters; let it go.

        A lock in the live counters (an admin's, or a changed User-Agent's while enforced) still
        refuses. The shadow reservation holds the whole call (never slices: nothing extends it)
        until the tenant's ``max_call_seconds`` plus grace, the longest the call may really
        last, so only a lost hangup is swept. Unreachable shadow counters let the call go.
        """
        tenant, extension, rate = policy.tenant, policy.extension, policy.rate
        assert tenant is not None and extension is not None and rate is not None
        live = await self._live_state(tenant.name, extension.name)
        if live is not None and live.locked:
            return self._judged(attempt, Reason.EXTENSION_LOCKED, number, policy, now)
        shadow_request = dataclasses.replace(
            request,
            grace_seconds=min(tenant.max_call_seconds + request.grace_seconds, MAX_CALL_SECONDS),
            slice_seconds=None,
        )
        try:
            if self.shadow_ledger is None:
                raise StorageError("no shadow counters in this process")
            reservation = await self.shadow_ledger.reserve(shadow_request)
        except StorageError as exc:
            return self._shadow_refused(
                attempt, Reason.STORE_UNAVAILABLE, number, policy, tenant, error=str(exc)[:200]
            )
        if not reservation.allowed:
            locked_now = {"locked": True} if reservation.locked_now else {}
            return self._shadow_refused(
                attempt, reservation.reason, number, policy, tenant, **locked_now
            )
        allowed = Decision(Result.ALLOW, Reason.ALLOWED, 0, attempt.call_id, number, rate)
        return let_go(allowed, tenant)

    def _shadow_refused(
        self,
        attempt: CallAttempt,
        reason: Reason,
        number: str,
        policy: PolicyResult,
        tenant: TenantConfig,
        **detail: object,
    ) -> Decision:
        """Record what the shadow counters would have refused and let the call go."""
        self._emit_shadow_refused(attempt, reason, policy, **detail)
        return let_go(
            Decision(Result.DENY, reason, 0, attempt.call_id, number, policy.rate), tenant
        )

    def _emit_shadow_refused(
        self, attempt: CallAttempt, reason: Reason, policy: PolicyResult, **detail: object
    ) -> None:
        """Record what Guard would have refused (``shadow_refused``).

        Not counted towards IP blocks: a customer trying out a tight limit must not get its own
        PBX blocked.
        """
        rate = policy.rate
        self.events.emit(
            Event(
                EventKind.SHADOW_REFUSED,
                reason,
                attempt.tenant,
                attempt.extension,
                attempt.source_ip,
                attempt.call_id,
                {
                    "number": attempt.number,
                    "ua": attempt.user_agent,
                    "class": rate.dest_class.value if rate is not None else "",
                    **detail,
                },
            )
        )

    def _refuse(
        self,
        attempt: CallAttempt,
        reason: Reason,
        number: str,
        policy: PolicyResult,
        now: float,
        *,
        count: bool = True,
    ) -> Decision:
        self.events.emit(
            Event(
                EventKind.REFUSED,
                reason,
                attempt.tenant,
                attempt.extension,
                attempt.source_ip,
                attempt.call_id,
                {"number": attempt.number, "ua": attempt.user_agent},
            )
        )
        if count:
            self._spawn(self._count_refusal(attempt, reason, policy, now))
        return Decision(
            Result.DENY,
            reason,
            0,
            attempt.call_id,
            number=number,
            destination=policy.rate,
        )

    async def _release(self, tenant: str, call_id: str, attempts: int = 20) -> None:
        """Free a reservation that a timed-out ``reserve`` may have made for a refused call.

        The script may have run although its answer never came back; settling at 0 seconds
        releases it. If it did not run, the settle only leaves a marker (no event: expected).
        """
        delay = 0.5
        for _ in range(attempts):
            try:
                await self.ledger.settle(tenant, call_id, 0, self.clock())
            except StorageError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                return
        log.warning(
            "reservation of a refused call not released; the sweeper will charge it",
            extra=log_fields(tenant=tenant, call_id=call_id),
        )

    def _blocked(self, snapshot: Snapshot, attempt: CallAttempt, now: float) -> PolicyResult | None:
        """The refusal of a call from a blocked source IP, else ``None`` (no I/O).

        Emergency numbers pass even from a blocked address.
        """
        perimeter = self.perimeter
        if perimeter is None or not len(perimeter.blocks):
            return None
        tenant = snapshot.tenant(attempt.tenant)
        block = perimeter.blocked(parse_source_ip(attempt.source_ip), tenant, snapshot, now)
        if block is None or is_emergency_number(tenant, attempt.number):
            return None
        ends = "until unblocked" if block.until is None else f"until {int(block.until)}"
        detail = f"{block.ip} is blocked {ends}: {block.reason}"
        outcome = CheckOutcome("ip_block", False, Reason.IP_BLOCKED, detail)
        return PolicyResult(Reason.IP_BLOCKED, (outcome,), tenant=tenant)

    async def _count_refusal(
        self, attempt: CallAttempt, reason: Reason, policy: PolicyResult, now: float
    ) -> None:
        """Count the refusal per source IP (every tenant) and per extension (known tenants);
        the IP's count may block it, which emits the block's one ``ip_blocked`` event."""
        perimeter, tenant = self.perimeter, policy.tenant
        address = policy.source_ip or parse_source_ip(attempt.source_ip)
        rule = None
        window = _WINDOW_MINUTES
        if perimeter is not None:
            rule = perimeter.block_rule(address, reason, tenant, self.snapshots.current)
            window = perimeter.settings.window_minutes
        try:
            counts = await self.ledger.record_refusal(
                tenant.name if tenant is not None else "",
                attempt.extension if tenant is not None else "",
                str(address) if address is not None else attempt.source_ip,
                reason,
                now,
                block=rule,
                window_minutes=window,
            )
        except StorageError:
            log.debug("refusal not counted: store unavailable")
            return
        if perimeter is not None:
            perimeter.note(counts)
        if counts.blocked_now and counts.block is not None:
            self._emit_block(attempt, counts.block)

    def _emit_block(self, attempt: CallAttempt, block: IpBlock) -> None:
        self.events.emit(
            Event(
                EventKind.IP_BLOCKED,
                block.reason,
                attempt.tenant,
                attempt.extension,
                block.ip,
                attempt.call_id,
                {
                    "until": "-" if block.until is None else int(block.until),
                    "refusals": block.refusals,
                    "ua": attempt.user_agent,
                },
            )
        )

    def _spend_events(
        self,
        attempt: CallAttempt,
        tenant: TenantConfig,
        extension: ExtensionConfig,
        day: str,
        reservation: Reservation,
    ) -> None:
        """``spend_warning`` when settled spend reached the warning share of a daily limit, once
        a day per scope in this process (the alerts de-duplicate across processes). A used-up
        limit needs no event of its own: it is the refusal (``daily_limit_*``)."""
        scopes = (
            (Reason.DAILY_LIMIT_EXTENSION, extension.name, extension.daily_limit),
            (Reason.DAILY_LIMIT_TENANT, "", tenant.daily_limit),
        )
        spent_of = (reservation.ext_spent, reservation.tenant_spent)
        for (limit_reason, ext_name, limit), spent in zip(scopes, spent_of, strict=True):
            if not limit or spent * 100 < limit * self.settings.spend_warn_percent:
                continue
            seen = (tenant.name, ext_name, day)
            if seen in self._spend_seen:
                continue
            if len(self._spend_seen) >= _SPEND_SEEN_MAX:
                self._spend_seen.clear()
            self._spend_seen.add(seen)
            self.events.emit(
                Event(
                    EventKind.SPEND_WARNING,
                    limit_reason,
                    tenant.name,
                    ext_name,
                    attempt.source_ip,
                    attempt.call_id,
                    {"spent": spent, "limit": limit, "percent": spent * 100 // limit, "day": day},
                )
            )

    def _store_unavailable(
        self,
        attempt: CallAttempt,
        policy: PolicyResult,
        number: str,
        error: str,
        *,
        emit: bool = True,
    ) -> Decision:
        tenant, rate = policy.tenant, policy.rate
        assert tenant is not None and rate is not None
        fail_open = (
            tenant.fail_mode is FailMode.ALLOW_LOCAL and rate.dest_class in FAIL_OPEN_CLASSES
        )
        if emit:
            self.events.emit(
                Event(
                    EventKind.FAIL_OPEN if fail_open else EventKind.STORE_UNAVAILABLE,
                    Reason.STORE_UNAVAILABLE,
                    attempt.tenant,
                    attempt.extension,
                    attempt.source_ip,
                    attempt.call_id,
                    {
                        "number": attempt.number,
                        "class": rate.dest_class.value,
                        "error": error[:200],
                    },
                )
            )
        if fail_open:
            return Decision(
                Result.ALLOW,
                Reason.STORE_UNAVAILABLE,
                self.settings.fail_open_max_seconds,
                attempt.call_id,
                number=number,
                destination=rate,
            )
        return Decision(
            Result.DENY,
            Reason.STORE_UNAVAILABLE,
            0,
            attempt.call_id,
            number=number,
            destination=rate,
        )

    async def settle(self, tenant: str, call_id: str, billsec: int) -> SettleResult:
        """Charge the real cost of a finished call, exactly once (see the ledger).

        A call the live counters reserved is settled there (one round trip). Else, a call the
        shadow counters hold (open, settled or swept) is settled there, silently: only its
        would-be spend changes. A call neither knows is recorded as unknown in the live ones.
        """
        billsec, now, shadow = max(0, billsec), self.clock(), self.shadow_ledger
        if shadow is None:
            result = await self.ledger.settle(tenant, call_id, billsec, now)
        else:
            result = await self.ledger.settle(tenant, call_id, billsec, now, probe=True)
            if result.outcome is SettleOutcome.UNKNOWN_CALL:
                shadowed = await shadow.settle(tenant, call_id, billsec, now, probe=True)
                if shadowed.outcome is not SettleOutcome.UNKNOWN_CALL:
                    return shadowed
                result = await self.ledger.settle(tenant, call_id, billsec, now)
        detail: dict[str, object] = {"billsec": billsec, "cost": result.cost}
        if result.outcome is SettleOutcome.UNKNOWN_CALL:
            self.events.emit(
                Event(EventKind.ORPHAN_SETTLE, "unknown_call", tenant, "", "", call_id, detail)
            )
        elif result.outcome is SettleOutcome.SETTLED_AFTER_SWEEP:
            self.events.emit(
                Event(
                    EventKind.SETTLED_AFTER_SWEEP,
                    "late_settle",
                    tenant,
                    result.extension,
                    "",
                    call_id,
                    detail,
                )
            )
        if result.over_reservation:
            detail["reserved"] = result.reserved
            self.events.emit(
                Event(
                    EventKind.OVER_RESERVATION,
                    "call_outlived_limit",
                    tenant,
                    result.extension,
                    "",
                    call_id,
                    detail,
                )
            )
        return result

    async def sweep(self) -> list[SweptCall]:
        """Charge in full every reservation past its deadline, in every tenant.

        The shadow counters are swept too; their swept calls are events (``shadow`` in the
        detail), not part of the answer, which is about money.
        """
        now = self.clock()
        swept: list[SweptCall] = []
        for tenant in list(self.snapshots.current.tenants):
            calls = await self.ledger.sweep(tenant, now)
            self._emit_swept(calls)
            swept.extend(calls)
            if self.shadow_ledger is not None:
                self._emit_swept(await self.shadow_ledger.sweep(tenant, now), shadow=True)
        return swept

    def _emit_swept(self, calls: list[SweptCall], *, shadow: bool = False) -> None:
        for call in calls:
            detail: dict[str, object] = {"charged": call.charged, "deadline": int(call.deadline)}
            if shadow:
                detail["shadow"] = True
            self.events.emit(
                Event(
                    EventKind.SWEPT,
                    "reservation_expired",
                    call.tenant,
                    call.extension,
                    "",
                    call.call_id,
                    detail,
                )
            )

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except StorageError as exc:
                log.warning("sweep skipped: store unavailable", extra=log_fields(error=str(exc)))
            honour_cancellation()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background refusal counting (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
