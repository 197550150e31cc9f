"""Events: every refusal, lock, block, orphan settle and swept reservation, told three ways.

``EventBus.emit`` is called on the hot path and never blocks or does I/O beyond one log line:
(a) it writes one structured log line (logger ``guard.events``) whose first fields are fixed —
``kind``, ``reason``, ``src`` (a validated IP or ``-``), ``tenant``, ``ext`` — so a fail2ban
filter can anchor on them, with every attacker-controlled value escaped after them;
(b) it queues the event for the audit table, written in batches by a background task that
retries while SQL is down, with a bounded buffer (the oldest events are dropped and counted
past it); (c) it hands the event to the registered sinks (alerts, metrics).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from guard.logs import log_fields

log = logging.getLogger("guard.events")
writer_log = logging.getLogger("guard.audit")


class EventKind:
    """Stable event kinds (strings, like reason codes: add, never reuse)."""

    REFUSED = "refused"
    LOCKED = "locked"
    IP_BLOCKED = "ip_blocked"
    ORPHAN_SETTLE = "orphan_settle"
    SWEPT = "swept"
    OVER_RESERVATION = "over_reservation"
    SETTLED_AFTER_SWEEP = "settled_after_sweep"
    STORE_UNAVAILABLE = "store_unavailable"
    FAIL_OPEN = "fail_open"
    ADMIN = "admin"
    #: Guard hung up a live call over ARI: its interval reservation could not be extended, or
    #: an alert rule cut the calls of a locked extension (the reason says which).
    CALL_CUT = "call_cut"
    #: Settled spend reached the warning share (80% by default) of a daily limit. A used-up
    #: limit is the ``refused`` event with reason ``daily_limit_extension``/``_tenant``.
    SPEND_WARNING = "spend_warning"
    #: Shadow mode (``guard.shadow``): Guard would have refused the call for the reason given,
    #: and let it go.
    SHADOW_REFUSED = "shadow_refused"


def safe_ip(text: str) -> str:
    """The canonical form of an IP address, or ``-``: only real addresses reach ``src=``."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return "-"


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    reason: str = ""
    tenant: str = ""
    extension: str = ""
    source_ip: str = ""
    call_id: str = ""
    detail: Mapping[str, object] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {
            "kind": self.kind,
            "reason": self.reason or "-",
            "src": safe_ip(self.source_ip) if self.source_ip else "-",
            "tenant": self.tenant or "-",
            "ext": self.extension or "-",
            "call_id": self.call_id or "-",
        }
        for key, value in self.detail.items():
            fields[key] = value
        return fields


class EventSink(Protocol):
    def __call__(self, event: Event, /) -> None: ...


AuditBatchWriter = Callable[[list[Event]], None]
#: Seconds a background writer (audit table, event feed) waits after a first event for more, so
#: that a burst costs one write, not one per event; what is pending is flushed on shutdown.
BATCH_LINGER = 0.2


class EventBus:
    """Fan-out of events to the log, the audit writer and the sinks; ``emit`` never blocks."""

    def __init__(self, *, buffer_size: int = 100_000) -> None:
        self._sinks: list[EventSink] = []
        self._pending: deque[Event] = deque()
        self._buffer_size = buffer_size
        self._wakeup = asyncio.Event()
        self.dropped = 0
        self.emitted = 0

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def emit(self, event: Event) -> None:
        self.emitted += 1
        level = logging.INFO if event.kind == EventKind.ADMIN else logging.WARNING
        log.log(level, "event", extra=log_fields(**event.log_fields()))
        if len(self._pending) >= self._buffer_size:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(event)
        self._wakeup.set()
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event sink failed", extra=log_fields(sink=repr(sink)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run_audit_writer(
        self,
        write_batch: AuditBatchWriter,
        *,
        batch_size: int = 500,
        retry_delay: float = 1.0,
        max_retry_delay: float = 30.0,
        linger: float = BATCH_LINGER,
    ) -> None:
        """Write queued events to the audit table until cancelled; retries while SQL is down.

        After the first event of a batch it waits ``linger`` seconds for more: under a flood of
        refusals one transaction then carries many rows instead of one each.
        """
        delay = retry_delay
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                await asyncio.sleep(linger)
            batch = [self._pending[i] for i in range(min(batch_size, len(self._pending)))]
            try:
                await asyncio.to_thread(write_batch, batch)
            except Exception as exc:
                writer_log.warning(
                    "audit write failed, will retry",
                    extra=log_fields(pending=len(self._pending), error=str(exc)[:200]),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_delay)
                continue
            delay = retry_delay
            self._forget(batch)

    async def flush(self, write_batch: AuditBatchWriter) -> None:
        """Write everything pending now (shutdown, CLI); raises if SQL refuses."""
        while self._pending:
            batch = list(self._pending)
            await asyncio.to_thread(write_batch, batch)
            self._forget(batch)

    def _forget(self, written: list[Event]) -> None:
        """Drop the written events from the queue's head (some may already have overflowed)."""
        for event in written:
            if self._pending and self._pending[0] is event:
                self._pending.popleft()


def audit_row(event: Event) -> dict[str, object]:
    """The ``audit_events`` row of an event."""
    return {
        "at": datetime.fromtimestamp(event.at, UTC),
        "kind": event.kind[:32],
        "reason": event.reason[:48],
        "tenant": event.tenant[:64],
        "extension": event.extension[:80],
        "source_ip": event.source_ip[:64],
        "call_id": event.call_id[:64],
        "actor": str(event.detail.get("actor", ""))[:64],
        "detail": json.dumps(dict(event.detail), ensure_ascii=True, default=str),
    }
