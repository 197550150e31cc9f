"""Interval reservations: the extender that grows each interval call's reservation slice by
slice, and cuts the call over ARI when the budget cannot pay the next slice.

A tenant in ``interval`` mode has each call reserve only a slice (``slice_seconds``) of its
budget, so that parallel calls share the day's budget as they go instead of the first call
holding its longest possible call. The dialplan dials such a call with ``L(<cap>)``, the longest
it may last (what a whole-call reservation would have granted it), and Guard must cut it when
its reserved money runs out. Asterisk 16 cannot be told a new ``TIMEOUT(absolute)`` for a channel
outside Stasis (``POST /channels/{id}/variable`` answers 409, and an interval call is outside
Stasis while it talks, whether it came by FastAGI or was continued by the Stasis app), so the
extender enforces the slice itself: it hangs the channel up (``DELETE /channels/{id}``, which
Asterisk accepts for any channel) ``cut_margin`` seconds before the reserved money runs out.

``SliceExtender.tick`` reads, for each tenant in interval mode (and each tenant whose interval
calls are still live), the reservations whose slice ends within ``lead`` seconds
(``RedisLedger.due_slices``), and extends each one (``extend_slice``: atomic, both daily limits,
one extension per slice however many extenders run). A refused extension is final: the call is
cut when its slice ends. Every cut is claimed in the ledger first (``claim_cut``), so one
extender cuts, and a cut whose hang-up failed is given back for the next tick. It also tells the
ledger that an extender serves each interval tenant, for ``3 * tick`` seconds; without one,
``reserve`` falls back to whole-call reservations, which Asterisk enforces by itself.

Precision of a cut (see README, "Interval reservations"): the cut is timed by the event loop
from the ledger's slice end, not by the tick, so it lands ``cut_margin`` before the money runs
out, late by the timer's jitter plus the ARI round trip plus Asterisk's soft hang-up (measured
against the stand-in in ``tests/test_interval.py``). A tick only has to come within ``lead``.
If Redis is unreachable, calls already known to end are cut at their slice end (fail closed).
If no extender runs at all, calls already in interval mode run until their cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from guard.ari.client import AriError, ChannelNotFound
from guard.calls import ChannelHangup
from guard.domain import Reason, ReservationMode
from guard.engine import SnapshotHolder
from guard.errors import ConfigurationError, StorageError
from guard.events import Event, EventBus, EventKind
from guard.ledger.types import SliceCall, SliceExtension
from guard.logs import log_fields

log = logging.getLogger("guard.interval")

#: Tenants whose interval calls are read at once in one tick.
_READ_BATCH = 64
#: "Every slice, however far": how a tenant that left interval mode is read (epoch seconds).
_EVER = 2.0**40


class SliceLedger(Protocol):
    """What the extender needs from the ledger (``RedisLedger`` provides it)."""

    async def due_slices(
        self, tenant: str, until: float, *, alive_seconds: float = 0.0, limit: int = 1000
    ) -> list[SliceCall]: ...

    async def extend_slice(
        self,
        call: SliceCall,
        now: float,
        *,
        ext_daily_limit: int | None,
        tenant_daily_limit: int | None,
        deny: str = "",
    ) -> SliceExtension: ...

    async def claim_cut(self, tenant: str, call_id: str, ends_ms: int) -> bool: ...

    async def restore_cut(self, tenant: str, call_id: str, ends_ms: int) -> None: ...


@dataclass(frozen=True, slots=True)
class ExtenderSettings:
    """``lead``: extend a slice this many seconds before it ends (must exceed ``tick`` plus the
    ledger's and ARI's timeouts, or an extension may come too late). ``tick``: seconds between
    passes. ``cut_margin``: hang up this long before the reserved money runs out, so that the
    ARI round trip does not make the call outlive it."""

    lead: float = 15.0
    tick: float = 1.0
    cut_margin: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.tick < self.lead:
            raise ConfigurationError("interval extender: the tick must be positive and < lead")
        if self.cut_margin < 0:
            raise ConfigurationError("interval extender: the cut margin must not be negative")

    @property
    def alive_seconds(self) -> float:
        """How long one pass vouches that an extender serves a tenant."""
        return 3 * self.tick


class SliceExtender:
    """Extends interval reservations before they run out and cuts the calls they cannot pay.

    Safe to run in several processes at once: the ledger decides every extension and every cut
    atomically. ``run()`` ticks until cancelled; ``tick()`` is one pass. ``clock`` (epoch
    seconds) and ``sleep`` time the cuts; tests give a fake pair. ``cuts`` counts the calls this
    extender hung up.
    """

    def __init__(
        self,
        ledger: SliceLedger,
        snapshots: SnapshotHolder,
        channels: ChannelHangup,
        events: EventBus,
        settings: ExtenderSettings | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ledger = ledger
        self.snapshots = snapshots
        self.channels = channels
        self.events = events
        self.settings = settings or ExtenderSettings()
        self.clock = clock
        self.sleep = sleep
        self.cuts = 0
        #: Tenants served in interval mode, and those that left it (switched, disabled, removed)
        #: while their interval calls still run: those calls are served until they end.
        self._active: set[str] = set()
        #: The last known due calls of each tenant, cut blind should the ledger go away.
        self._known: dict[str, dict[str, SliceCall]] = {}
        self._timers: dict[tuple[str, str, int], asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Tick every ``settings.tick`` seconds until cancelled; a failing pass is logged."""
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.tick()
                except Exception:
                    log.exception("interval extender: pass failed")
                await asyncio.sleep(max(0.0, self.settings.tick - (time.monotonic() - started)))
        finally:
            await self.close()

    async def tick(self) -> None:
        """One pass: read every served tenant's due slices, extend them or time their cuts."""
        snapshot = self.snapshots.current
        interval = {
            name
            for name, tenant in snapshot.tenants.items()
            if tenant.reservation_mode is ReservationMode.INTERVAL and tenant.enabled
        }
        names = sorted(interval | self._active)
        for start in range(0, len(names), _READ_BATCH):
            batch = names[start : start + _READ_BATCH]
            await asyncio.gather(*(self._serve_tenant(name, name in interval) for name in batch))

    async def drain(self) -> None:
        """Wait for the cuts timed so far (tests, shutdown)."""
        while self._timers:
            await asyncio.gather(*self._timers.values(), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the timed cuts (their slices stay in the ledger for the next extender)."""
        timers = list(self._timers.values())
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)

    async def _serve_tenant(self, tenant: str, interval: bool) -> None:
        now = self.clock()
        until = now + self.settings.lead
        alive = self.settings.alive_seconds if interval else 0.0
        try:
            found = await self.ledger.due_slices(
                tenant, until if interval else _EVER, alive_seconds=alive
            )
        except StorageError as exc:
            log.warning(
                "interval extender: ledger unreachable; known slices are cut when they end",
                extra=log_fields(tenant=tenant, error=str(exc)),
            )
            for call in self._known.get(tenant, {}).values():
                self._time_cut(call, Reason.STORE_UNAVAILABLE.value)
            return
        if interval or found:
            self._active.add(tenant)
        else:
            self._active.discard(tenant)
        due = [call for call in found if call.ends_ms <= until * 1000]
        self._known[tenant] = {call.call_id: call for call in due}
        for call in due:
            await self._serve_call(call)

    async def _serve_call(self, call: SliceCall) -> None:
        if call.final:
            self._time_cut(call, call.final)
            return
        try:
            answer = await self._extend(call)
        except StorageError as exc:
            log.warning(
                "interval extender: extension failed; the call is cut when its slice ends "
                "unless a later pass extends it",
                extra=log_fields(tenant=call.tenant, call_id=call.call_id, error=str(exc)),
            )
            self._time_cut(call, Reason.STORE_UNAVAILABLE.value)
            return
        if answer.extended:
            self._known.setdefault(call.tenant, {})[call.call_id] = dataclasses.replace(
                call,
                max_seconds=answer.max_seconds,
                reserved=answer.reserved,
                ends_ms=answer.ends_ms,
            )
            log.info(
                "interval extender: slice extended",
                extra=log_fields(
                    tenant=call.tenant,
                    call_id=call.call_id,
                    max_seconds=answer.max_seconds,
                    reserved=answer.reserved,
                ),
            )
        elif answer.refused:
            log.info(
                "interval extender: extension refused; the call ends with its slice",
                extra=log_fields(tenant=call.tenant, call_id=call.call_id, reason=answer.outcome),
            )
            self._time_cut(call, answer.outcome)

    async def _extend(self, call: SliceCall) -> SliceExtension:
        """``extend_slice`` with the limits of the current configuration; a tenant or extension
        that was removed, disabled or locked meanwhile refuses the extension."""
        snapshot = self.snapshots.current
        tenant = snapshot.tenant(call.tenant)
        extension = snapshot.extension(call.tenant, call.extension)
        deny = ""
        if tenant is None or not tenant.enabled:
            deny = Reason.UNKNOWN_TENANT.value
        elif extension is None:
            deny = Reason.UNKNOWN_EXTENSION.value
        elif extension.locked:
            deny = Reason.EXTENSION_LOCKED.value
        return await self.ledger.extend_slice(
            call,
            self.clock(),
            ext_daily_limit=extension.daily_limit if extension else None,
            tenant_daily_limit=tenant.daily_limit if tenant else None,
            deny=deny,
        )

    def _time_cut(self, call: SliceCall, reason: str) -> None:
        """Cut ``call`` ``cut_margin`` before its slice ends (at once if that is past)."""
        key = (call.tenant, call.call_id, call.ends_ms)
        if key in self._timers:
            return
        timer = asyncio.create_task(self._cut_at(call, reason), name=f"cut {call.call_id}")
        self._timers[key] = timer
        timer.add_done_callback(lambda _: self._timers.pop(key, None))

    async def _cut_at(self, call: SliceCall, reason: str) -> None:
        target = call.ends_ms / 1000 - self.settings.cut_margin
        await self.sleep(max(0.0, target - self.clock()))
        try:
            claimed = await self.ledger.claim_cut(call.tenant, call.call_id, call.ends_ms)
        except StorageError:
            claimed = True  # fail closed: no ledger to ask, the reserved money runs out now
        if not claimed:
            return  # extended meanwhile, or another extender cut it
        fields = log_fields(tenant=call.tenant, call_id=call.call_id, reason=reason)
        try:
            await self.channels.hangup(call.call_id, "normal")
        except ChannelNotFound:
            log.info("interval extender: the call had already ended", extra=fields)
            return
        except AriError as exc:
            log.error(
                "interval extender: hang-up failed; retrying next pass",
                extra=log_fields(**fields, error=str(exc)),
            )
            with contextlib.suppress(StorageError):
                await self.ledger.restore_cut(call.tenant, call.call_id, call.ends_ms)
            return
        late_ms = round((self.clock() - target) * 1000, 1)
        self.cuts += 1
        self.events.emit(
            Event(
                EventKind.CALL_CUT,
                reason,
                call.tenant,
                call.extension,
                "",
                call.call_id,
                {
                    "max_seconds": call.max_seconds,
                    "reserved": call.reserved,
                    "late_ms": late_ms,
                },
            )
        )
