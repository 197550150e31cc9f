"""The event feed: what the bus emits, kept in Redis so the dashboard can show it live.

``EventFeed`` is an ``EventBus`` sink. Its ``__call__`` runs on the hot path, so it only appends
to a bounded in-memory queue (never I/O, never blocks); ``run`` (a background task of
``guard serve``) writes the queue in batches, one pipelined round trip a batch, and retries with
backoff while Redis is away. Past ``buffer_size`` queued events the oldest are dropped and
counted. The feed is observation, not money: losing some of it never changes a decision, and no
key here is read by the engine. The same class reads the keys back for the dashboard.

Only tenants of the current configuration get per-tenant keys (a refused attempt can name any
tenant it likes); source IPs are canonicalized and everything from the network is cut short, so
every key and collection stays bounded. Keys (``P`` is the ledger prefix; ``T`` is encoded as
in ``guard.ledger.keys``; hours and days are UTC unless said otherwise)::

    P:{t:T}:events                 list  recent events of the tenant, JSON, newest first,
                                         capped at TENANT_EVENTS; TTL 7 days
    P:{t:T}:refusals:<YYYYMMDDHH>  hash  refusals in that hour: <reason> -> count, and
                                         <slot>:<reason> per 5-minute slot (00-11) for the
                                         rolling last hour; TTL 2 days
    P:{t:T}:alerts:<YYYYMMDD>      hash  alerts on the tenant's own day (its time zone):
                                         <kind> -> count; TTL 8 days
    P:{feed}:events                list  recent events of every tenant, capped at GLOBAL_EVENTS
    P:{feed}:alerts:<YYYYMMDD>     hash  alerts of the day, any tenant or none: <kind> -> count
    P:{feed}:ips:<YYYYMMDD>        zset  refused source IPs of the day by refusals (top TOP_IPS)
    P:{feed}:scanners:<YYYYMMDD>   zset  scanner User-Agents of the day by hits (top TOP_SCANNERS)
    P:{feed}:scanner-ips:<YYYYMMDD> zset source IPs of scanner hits of the day (top TOP_IPS)
                                         (the {feed} keys: TTL 8 days, events 7 days)

An *alert* is any event that is not a plain refusal or an admin action: a lock, an IP block,
a swept reservation, an orphan or late settle, a call over its reservation, the store failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from guard.aio import honour_cancellation
from guard.domain import Reason
from guard.errors import StorageError
from guard.events import BATCH_LINGER, Event, EventKind, safe_ip
from guard.ledger import keys
from guard.ledger.redis_ledger import RedisClient
from guard.logs import log_fields
from guard.schedule import zone
from guard.snapshot import Snapshot

log = logging.getLogger("guard.feed")
_T = TypeVar("_T")

TENANT_EVENTS = 200
GLOBAL_EVENTS = 1000
TOP_IPS = 1000
TOP_SCANNERS = 200
EVENTS_TTL = 7 * 86_400
REFUSALS_TTL = 2 * 86_400
DAILY_TTL = 8 * 86_400
#: Width of one slot of the rolling-hour refusal counts, in minutes.
SLOT_MINUTES = 5
#: Longest text kept from any one event field (User-Agents, numbers, error messages).
MAX_TEXT = 200
MAX_DETAIL_FIELDS = 12
#: Kinds that are not alerts.
_NOT_ALERTS = frozenset({EventKind.REFUSED, EventKind.ADMIN})

#: The tenant's time zone, or ``None`` for a tenant the configuration does not know.
TenantZone = Callable[[str], str | None]


def _cut(value: object, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _utc(now: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(now))


def _ip(text: str) -> str:
    """The canonical address, or ``""`` for anything that is not one."""
    canonical = safe_ip(text) if text else "-"
    return "" if canonical == "-" else canonical


def utc_day(now: float) -> str:
    """The UTC day (``YYYYMMDD``) of the global feed keys at ``now``."""
    return _utc(now, "%Y%m%d")


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One event as the feed keeps it (every text already cut to ``MAX_TEXT``)."""

    at: float
    kind: str
    reason: str = ""
    tenant: str = ""
    extension: str = ""
    source_ip: str = ""
    call_id: str = ""
    detail: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, event: Event) -> FeedEvent:
        detail = {
            _cut(key, 32): _cut(value)
            for key, value in list(event.detail.items())[:MAX_DETAIL_FIELDS]
        }
        return cls(
            at=round(event.at, 3),
            kind=_cut(event.kind, 32),
            reason=_cut(event.reason, 48),
            tenant=_cut(event.tenant, 64),
            extension=_cut(event.extension, 80),
            source_ip=_ip(event.source_ip),
            call_id=_cut(event.call_id, 64),
            detail=detail,
        )

    @classmethod
    def from_json(cls, text: str) -> FeedEvent | None:
        """The event packed in ``text``, or ``None`` if it is not one (never raises)."""
        try:
            raw = json.loads(text)
            return cls(
                at=float(raw["at"]),
                kind=str(raw["kind"]),
                reason=str(raw.get("reason", "")),
                tenant=str(raw.get("tenant", "")),
                extension=str(raw.get("extension", "")),
                source_ip=str(raw.get("source_ip", "")),
                call_id=str(raw.get("call_id", "")),
                detail={str(k): str(v) for k, v in dict(raw.get("detail", {})).items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True, separators=(",", ":"))

    @property
    def is_alert(self) -> bool:
        return self.kind not in _NOT_ALERTS


@dataclass(frozen=True, slots=True)
class Ranked:
    """One member of a daily top list (a source IP, a User-Agent) and its count."""

    name: str
    count: int


class EventFeed:
    """Writes events to the feed keys in the background, and reads them back (module docstring).

    ``tenant_zone`` tells the time zone of a known tenant (``None`` for any other name): events
    of unknown tenants go to the global keys only. Reads raise ``StorageError`` on failure.
    """

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        tenant_zone: TenantZone,
        *,
        buffer_size: int = 10_000,
        batch_size: int = 200,
        read_timeout: float = 2.0,
    ) -> None:
        self._client = client
        self._prefix = keys.check_prefix(prefix)
        self._tenant_zone = tenant_zone
        self._pending: deque[Event] = deque()
        self._buffer_size = buffer_size
        self._batch_size = batch_size
        self._read_timeout = read_timeout
        self._wakeup = asyncio.Event()
        self.dropped = 0
        self.written = 0

    # ---- writing --------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        """Queue ``event`` (the bus calls this; never blocks)."""
        if len(self._pending) >= self._buffer_size:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(event)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(
        self,
        *,
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        linger: float = BATCH_LINGER,
    ) -> None:
        """Write queued events until cancelled; a failed batch stays queued and is retried.
        A batch waits ``linger`` seconds after its first event for more (one pipeline each)."""
        delay = retry_delay
        while True:
            honour_cancellation()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                await asyncio.sleep(linger)
            batch = [self._pending[i] for i in range(min(self._batch_size, len(self._pending)))]
            try:
                await self.write(batch)
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                log.warning(
                    "event feed write failed, will retry",
                    extra=log_fields(pending=len(self._pending), error=_cut(exc)),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_retry_delay)
                continue
            delay = retry_delay
            for event in batch:
                if self._pending and self._pending[0] is event:
                    self._pending.popleft()

    async def flush(self) -> None:
        """Write everything queued now (shutdown, tests); raises if Redis refuses."""
        while self._pending:
            batch = list(self._pending)[: self._batch_size]
            await self.write(batch)
            for _ in batch:
                self._pending.popleft()

    async def write(self, events: Iterable[Event]) -> None:
        """Write ``events`` in one pipelined round trip (not atomic: counts are independent)."""
        pipe = self._client.pipeline(transaction=False)
        touched: dict[str, int] = {}
        count = 0
        for event in events:
            count += 1
            for key, ttl in self._add(pipe, FeedEvent.of(event)):
                touched[key] = ttl
        for key, ttl in touched.items():
            pipe.expire(key, ttl)
        if touched:
            await pipe.execute()
            self.written += count

    def _add(self, pipe: Any, item: FeedEvent) -> list[tuple[str, int]]:
        """Queue the commands of one event on ``pipe``; returns the keys touched and their TTL."""
        packed = item.to_json()
        day = _utc(item.at, "%Y%m%d")
        glob = self._global_base()
        touched = [(f"{glob}:events", EVENTS_TTL)]
        pipe.lpush(f"{glob}:events", packed)
        pipe.ltrim(f"{glob}:events", 0, GLOBAL_EVENTS - 1)
        if item.is_alert:
            pipe.hincrby(f"{glob}:alerts:{day}", item.kind, 1)
            touched.append((f"{glob}:alerts:{day}", DAILY_TTL))
        if item.kind == EventKind.REFUSED and item.source_ip:
            touched.append(self._top(pipe, f"{glob}:ips:{day}", item.source_ip, TOP_IPS))
        if item.kind == EventKind.REFUSED and item.reason == Reason.SCANNER_USER_AGENT:
            agent = item.detail.get("ua", "") or "(empty)"
            touched.append(self._top(pipe, f"{glob}:scanners:{day}", agent, TOP_SCANNERS))
            if item.source_ip:
                key = f"{glob}:scanner-ips:{day}"
                touched.append(self._top(pipe, key, item.source_ip, TOP_IPS))
        tz = self._tenant_zone(item.tenant) if item.tenant else None
        if tz is None:
            return touched
        base = keys.tenant_base(self._prefix, item.tenant)
        pipe.lpush(f"{base}:events", packed)
        pipe.ltrim(f"{base}:events", 0, TENANT_EVENTS - 1)
        touched.append((f"{base}:events", EVENTS_TTL))
        if item.kind == EventKind.REFUSED:
            hour_key = f"{base}:refusals:{_utc(item.at, '%Y%m%d%H')}"
            slot = int(_utc(item.at, "%M")) // SLOT_MINUTES
            pipe.hincrby(hour_key, item.reason, 1)
            pipe.hincrby(hour_key, f"{slot:02d}:{item.reason}", 1)
            touched.append((hour_key, REFUSALS_TTL))
        elif item.is_alert:
            local_day = datetime.fromtimestamp(item.at, zone(tz)).strftime("%Y%m%d")
            pipe.hincrby(f"{base}:alerts:{local_day}", item.kind, 1)
            touched.append((f"{base}:alerts:{local_day}", DAILY_TTL))
        return touched

    @staticmethod
    def _top(pipe: Any, key: str, member: str, keep: int) -> tuple[str, int]:
        pipe.zincrby(key, 1, member)
        pipe.zremrangebyrank(key, 0, -keep - 1)
        return key, DAILY_TTL

    def _global_base(self) -> str:
        return f"{self._prefix}:{{feed}}"

    # ---- reading (the dashboard) ------------------------------------------------------------

    async def recent(self, tenant: str | None = None, limit: int = 50) -> list[FeedEvent]:
        """The newest events, of one tenant or of all, newest first."""
        base = self._global_base() if tenant is None else keys.tenant_base(self._prefix, tenant)
        texts = await self._read(
            "recent events", self._client.lrange(f"{base}:events", 0, limit - 1)
        )
        found = (FeedEvent.from_json(_text(text)) for text in texts)
        return [event for event in found if event is not None]

    async def refusals_last_hour(self, tenant: str, now: float) -> dict[str, int]:
        """Refusals of the tenant by reason in the last 60 minutes (5-minute resolution)."""
        base = keys.tenant_base(self._prefix, tenant)
        slot = int(_utc(now, "%M")) // SLOT_MINUTES
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(f"{base}:refusals:{_utc(now, '%Y%m%d%H')}")
        pipe.hgetall(f"{base}:refusals:{_utc(now - 3600, '%Y%m%d%H')}")
        current, previous = await self._read("refusals", pipe.execute())
        counts: dict[str, int] = {}
        slots = 60 // SLOT_MINUTES
        for fields, keep in ((current, range(slot + 1)), (previous, range(slot + 1, slots))):
            for name, value in fields.items():
                slot_text, sep, reason = _text(name).partition(":")
                if sep and slot_text.isdigit() and int(slot_text) in keep:
                    counts[reason] = counts.get(reason, 0) + int(value)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    async def alerts(self, tenant: str | None, day: str) -> dict[str, int]:
        """Alerts by kind on ``day``: the tenant's own day, or the UTC day of all tenants."""
        base = self._global_base() if tenant is None else keys.tenant_base(self._prefix, tenant)
        raw = await self._read("alerts", self._client.hgetall(f"{base}:alerts:{day}"))
        return _counts(raw)

    async def top(self, what: str, day: str, limit: int = 20) -> list[Ranked]:
        """The day's top ``ips``, ``scanners`` or ``scanner-ips`` (UTC day), highest first."""
        if what not in {"ips", "scanners", "scanner-ips"}:
            raise ValueError(f"unknown top list {what!r}")
        key = f"{self._global_base()}:{what}:{day}"
        rows: list[Any] = await self._read(
            what, self._client.zrevrange(key, 0, limit - 1, withscores=True)
        )
        return [Ranked(_text(name), int(score)) for name, score in rows]

    async def _read(self, what: str, operation: Awaitable[_T]) -> _T:
        """Await a read within ``read_timeout``; any failure becomes ``StorageError``."""
        try:
            async with asyncio.timeout(self._read_timeout):
                return await operation
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise StorageError(f"event feed: reading {what} failed: {type(exc).__name__}") from exc


def _counts(raw: Mapping[Any, Any]) -> dict[str, int]:
    counts = {_text(name): int(value) for name, value in raw.items()}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def snapshot_zone(current: Callable[[], Snapshot]) -> TenantZone:
    """A ``TenantZone`` over the snapshot ``current()`` returns at each call."""

    def tenant_zone(tenant: str) -> str | None:
        config = current().tenants.get(tenant)
        return None if config is None else config.timezone

    return tenant_zone
