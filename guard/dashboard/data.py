"""What the dashboard shows, as plain JSON-able data: one method per page, shared by the JSON API.

Reads only: the ledger's counters and live calls, the event feed, the IP blocks, and the
configuration snapshot (tenants, extensions, limits, time zones, currencies). For a tenant in
shadow mode (``guard.shadow``: the tenant, or one of its extensions) the shadow counters are read
too, and shown apart as its row's ``shadow`` object (``None`` for every other tenant, which costs
no extra read): what its calls would have spent, reserved and held live, nothing enforced. Its
calls in progress on the shadow counters are listed among the live calls, marked ``shadow``.
Amounts stay integers in sub-units (``guard.money``) and times stay epoch seconds beside the
tenant's time zone; formatting is the renderer's job. A counter store that fails or times out
never breaks a page: the part it feeds is empty and ``store_error`` says why. Results are cached
for ``cache_seconds`` so that many open browsers cost Redis no more than one. The tenants, a
tenant's extensions and the live calls are listed whole (one batch of reads each, then cached)
and cut into pages (``Paging``) afterwards, each in a total order on keys that do not change
while one pages: tenants by name, calls by start then tenant and call id, extensions by name
(or by the column chosen, then name).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeVar

from guard.calls import calls_in_progress
from guard.domain import UaLockMode
from guard.engine import SnapshotHolder
from guard.errors import StorageError
from guard.feed import EventFeed, FeedEvent, utc_day
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.types import ExtensionState, SpendCounters, TenantCounters
from guard.schedule import tenant_day
from guard.shadow import in_shadow
from guard.snapshot import ExtensionConfig, Snapshot, TenantConfig

_T = TypeVar("_T")
JSON = dict[str, Any]

#: Most rows one page of a listing carries (tenants, extensions of a tenant, live calls).
MAX_ROWS = 1000
#: Concurrent Redis reads of one page (one per tenant on the overview).
READ_CONCURRENCY = 32
EXTENSION_SORTS = ("name", "spent", "reserved", "used", "live_calls", "locked")
EVENT_LIMIT = 50


def _used(spent: int, reserved: int, limit: int | None) -> float | None:
    """Share of a daily limit that is spent or reserved (``None`` without a limit)."""
    if limit is None:
        return None
    return 1.0 if limit <= 0 else round((spent + reserved) / limit, 4)


def _shadow_json(counters: SpendCounters, limit: int | None) -> JSON:
    """The ``shadow`` object of a row: would-be spend of shadow mode, never enforced."""
    return {
        "spent": counters.spent,
        "reserved": counters.reserved,
        "used": _used(counters.spent, counters.reserved, limit),
        "live_calls": counters.live_calls,
    }


def event_json(event: FeedEvent, timezone: str) -> JSON:
    return {**asdict(event), "timezone": timezone}


@dataclass(frozen=True, slots=True)
class Paging:
    """Which rows of a listing to show: at most ``limit`` of them from ``offset`` (0-based)."""

    offset: int = 0
    limit: int = MAX_ROWS

    @classmethod
    def parse(cls, offset: str | None, limit: str | None) -> Paging:
        """From a request's query text (missing or empty: the defaults); a ``limit`` above
        ``MAX_ROWS`` is capped. Anything else raises ``ValueError`` with a message for the client.
        """
        first = _whole(offset, 0, 0, "offset must be a whole number of rows to skip, 0 or more")
        size = _whole(limit, MAX_ROWS, 1, _LIMIT_ERROR)
        return cls(first, min(size, MAX_ROWS))


FIRST_PAGE: Final = Paging()
_LIMIT_ERROR: Final = f"limit must be a whole number of rows, 1 or more (capped at {MAX_ROWS})"


def _whole(text: str | None, default: int, low: int, message: str) -> int:
    """``text`` as an integer of ``low`` or more, in ASCII digits only (no sign, space or ``_``)."""
    if not text:
        return default
    if text.isascii() and text.isdigit():
        with contextlib.suppress(ValueError):  # more digits than ``int`` converts
            if (value := int(text)) >= low:
                return value
    raise ValueError(message)


def paged(listing: JSON, key: str, paging: Paging) -> JSON:
    """``listing`` with only the page of its ``key`` rows that ``paging`` asks for, and ``page``:
    the paging, the ``total`` of rows, the 1-based ``first`` to ``last`` shown (both 0 when none
    is), ``previous_offset`` and ``next_offset`` (``None`` at either end)."""
    rows: list[JSON] = listing[key]
    offset, limit, total = paging.offset, paging.limit, len(rows)
    shown = rows[offset : offset + limit]
    return {
        **listing,
        key: shown,
        "page": {
            "offset": offset,
            "limit": limit,
            "total": total,
            "first": offset + 1 if shown else 0,
            "last": offset + len(shown) if shown else 0,
            # Past the end: back to the last rows there are.
            "previous_offset": max(0, min(offset, total) - limit) if offset else None,
            "next_offset": offset + limit if offset + limit < total else None,
        },
    }


class DashboardData:
    """The data of every page, read from the ledger, the feed and the current snapshot."""

    def __init__(
        self,
        ledger: RedisLedger,
        feed: EventFeed,
        snapshots: SnapshotHolder,
        *,
        shadow_ledger: RedisLedger | None = None,
        clock: Callable[[], float] = time.time,
        cache_seconds: float = 1.0,
    ) -> None:
        self.ledger = ledger
        #: The shadow counters (``guard.service.shadow_ledger_for``); ``None``: not shown.
        self.shadow_ledger = shadow_ledger
        self.feed = feed
        self.snapshots = snapshots
        self.clock = clock
        self._cache_seconds = cache_seconds
        self._cache: dict[tuple[object, ...], tuple[float, Any]] = {}
        self._index: tuple[Snapshot | None, dict[str, list[ExtensionConfig]]] = (None, {})
        #: Per snapshot: each tenant's extensions in shadow mode of their own, by name.
        self._shadowed: dict[str, list[str]] = {}
        self._slots = asyncio.Semaphore(READ_CONCURRENCY)

    @property
    def snapshot(self) -> Snapshot:
        return self.snapshots.current

    def tenant_zone(self, tenant: str) -> str:
        config = self.snapshot.tenants.get(tenant)
        return config.timezone if config is not None else "UTC"

    async def _cached(self, key: tuple[object, ...], make: Callable[[], Awaitable[_T]]) -> _T:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._cache_seconds:
            value: _T = hit[1]
            return value
        value = await make()
        self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self._cache_seconds}
        self._cache[key] = (now, value)
        return value

    async def _read(self, read: Awaitable[_T]) -> _T:
        async with self._slots:
            return await read

    def extensions_of(self, tenant: str) -> list[ExtensionConfig]:
        """The tenant's configured extensions, by name (indexed once per snapshot)."""
        snapshot = self.snapshot
        if self._index[0] is not snapshot:
            index: dict[str, list[ExtensionConfig]] = {}
            for (owner, _), config in snapshot.extensions.items():
                index.setdefault(owner, []).append(config)
            for configs in index.values():
                configs.sort(key=lambda config: config.name)
            self._shadowed = {
                owner: names
                for owner, configs in index.items()
                if (names := [config.name for config in configs if config.shadow])
            }
            self._index = (snapshot, index)
        return self._index[1].get(tenant, [])

    def shadow_scope(self, config: TenantConfig) -> list[str] | None:
        """Which of the tenant's calls are in shadow mode: ``[]`` all of them (the tenant is),
        else its extensions that are, by name; ``None`` when none is (or nothing to read)."""
        if self.shadow_ledger is None:
            return None
        if config.shadow:
            return []
        self.extensions_of(config.name)  # (re)builds the index of this snapshot
        return self._shadowed.get(config.name)

    # ---- pages ----------------------------------------------------------------------------

    def status(self) -> JSON:
        """Where the data comes from and how fresh the configuration is."""
        holder = self.snapshots
        snapshot = holder.current
        return {
            "store": self.ledger.url,
            "config_version": snapshot.version,
            "snapshot_built_at": snapshot.built_at,
            "snapshot_age_seconds": round(max(0.0, self.clock() - snapshot.built_at), 1),
            "reload_error": holder.last_error,
            "reload_error_at": holder.last_error_at or None,
        }

    async def overview(self, paging: Paging = FIRST_PAGE) -> JSON:
        """The overview, with one page of ``tenants`` (by name)."""
        return paged(await self.all_tenants(), "tenants", paging)

    async def all_tenants(self) -> JSON:
        """The overview with every tenant's row, by name: ``/metrics`` ranks them all by spend."""
        return await self._cached(("overview",), self._overview)

    async def _overview(self) -> JSON:
        now = self.clock()
        tenants = list(self.snapshot.tenants.values())
        found = await asyncio.gather(*(self._tenant_summary(config, now) for config in tenants))
        rows = [row for row, _, _ in found]
        rows.sort(key=lambda row: row["name"])
        errors = sorted({row["store_error"] for row in rows if row["store_error"]})
        return {
            "now": now,
            "status": self.status(),
            "tenant_count": len(rows),
            "tenants": rows,
            "store_error": errors[0] if errors else "",
        }

    async def _tenant_summary(
        self, config: TenantConfig, now: float
    ) -> tuple[JSON, TenantCounters | None, TenantCounters | None]:
        """The tenant's overview row, its counters and, in shadow mode, its shadow counters
        (``None`` if the store failed or, for the shadow ones, outside shadow mode)."""
        day = tenant_day(config.timezone, now)
        scope = self.shadow_scope(config)
        row: JSON = {
            "name": config.name,
            "timezone": config.timezone,
            "currency": config.currency,
            "enabled": config.enabled,
            "day": day,
            "spent": 0,
            "reserved": 0,
            "daily_limit": config.daily_limit,
            "used": None,
            "live_calls": 0,
            "concurrent_limit": config.concurrent_limit,
            "refusals_last_hour": {},
            "alerts_today": {},
            "store_error": "",
            "shadow": None,
        }
        if scope is not None:
            row["shadow"] = {
                **_shadow_json(SpendCounters(), config.daily_limit),
                "tenant": config.shadow,
                "extensions": scope,
            }
        reads = [
            self.ledger.counters(config.name, day),
            self.feed.refusals_last_hour(config.name, now),
            self.feed.alerts(config.name, day),
        ]
        if scope is not None and self.shadow_ledger is not None:
            reads.append(self.shadow_ledger.counters(config.name, day))
        # All are awaited: the counters' error, which names the store, is the one shown.
        found = await asyncio.gather(*(self._read(read) for read in reads), return_exceptions=True)
        for result in found:
            if isinstance(result, StorageError):
                row["store_error"] = str(result)
                return row, None, None
            if isinstance(result, BaseException):
                raise result
        counters, refusals, alerts = found[:3]
        shadow = found[3] if len(found) > 3 else None
        assert isinstance(counters, TenantCounters)
        assert isinstance(refusals, dict) and isinstance(alerts, dict)
        total = counters.total
        row.update(
            spent=total.spent,
            reserved=total.reserved,
            used=_used(total.spent, total.reserved, config.daily_limit),
            live_calls=total.live_calls,
            refusals_last_hour=refusals,
            alerts_today=alerts,
        )
        if isinstance(shadow, TenantCounters):
            row["shadow"].update(_shadow_json(shadow.total, config.daily_limit))
        else:
            shadow = None
        return row, counters, shadow

    async def tenant(
        self,
        name: str,
        sort: str = "name",
        descending: bool = False,
        paging: Paging = FIRST_PAGE,
    ) -> JSON | None:
        """The tenant page: its summary, one page of its extensions (by ``sort``, then name),
        hourly spend and recent events."""
        config = self.snapshot.tenants.get(name)
        if config is None:
            return None
        if sort not in EXTENSION_SORTS:
            sort = "name"
        found = await self._cached(
            ("tenant", name, sort, descending), lambda: self._tenant(config, sort, descending)
        )
        return paged(found, "extensions", paging)

    async def _tenant(self, config: TenantConfig, sort: str, descending: bool) -> JSON:
        now = self.clock()
        summary, counters, shadow = await self._tenant_summary(config, now)
        extensions = self.extensions_of(config.name)
        names = [extension.name for extension in extensions]
        store_error = summary["store_error"]
        per_ext: Mapping[str, SpendCounters] = counters.extensions if counters else {}
        shadow_ext: Mapping[str, SpendCounters] = shadow.extensions if shadow else {}
        in_scope = summary["shadow"] is not None
        states: Mapping[str, ExtensionState] = {}
        hourly: JSON = self._hourly_json(config, summary["day"], {}, {})
        events: list[JSON] = []
        try:
            states, spend, recent = await asyncio.gather(
                self.ledger.extension_states(config.name, names),
                self.ledger.hourly_spend(config.name, summary["day"]),
                self.feed.recent(config.name, EVENT_LIMIT),
            )
        except StorageError as exc:
            store_error = store_error or str(exc)
        else:
            hourly = self._hourly_json(config, summary["day"], spend.total, spend.extensions)
            events = [event_json(event, config.timezone) for event in recent]
        rows = [
            self._extension_row(
                extension,
                per_ext.get(extension.name),
                states.get(extension.name),
                shadow_ext.get(extension.name, SpendCounters())
                if in_scope and in_shadow(config, extension)
                else None,
            )
            for extension in extensions
        ]
        rows.sort(key=_extension_sort_key(sort), reverse=descending)
        return {
            "now": now,
            "tenant": summary,
            "sort": sort,
            "descending": descending,
            "extension_count": len(rows),
            "extensions": rows,
            "hourly": hourly,
            "events": events,
            "store_error": store_error,
        }

    @staticmethod
    def _extension_row(
        config: ExtensionConfig,
        counters: SpendCounters | None,
        state: ExtensionState | None,
        shadow: SpendCounters | None = None,
    ) -> JSON:
        """One extension's row; ``shadow``: its shadow counters when it is in shadow mode."""
        spend = counters or SpendCounters()
        runtime = state or ExtensionState()
        return {
            "name": config.name,
            "profile": config.profile,
            "spent": spend.spent,
            "reserved": spend.reserved,
            "daily_limit": config.daily_limit,
            "used": _used(spend.spent, spend.reserved, config.daily_limit),
            "live_calls": spend.live_calls,
            "concurrent_limit": config.concurrent_limit,
            "locked": runtime.locked or config.locked,
            "runtime_locked": runtime.locked,
            "config_locked": config.locked,
            "lock_reason": runtime.lock_reason or config.lock_reason,
            "locked_at": runtime.locked_at,
            "ua_mode": config.ua_mode.value,
            "ua_pattern": config.ua_value if config.ua_mode is UaLockMode.PIN else None,
            "learned_user_agent": runtime.learned_user_agent,
            "shadow": None if shadow is None else _shadow_json(shadow, config.daily_limit),
        }

    async def hourly(self, name: str, day: str | None = None) -> JSON | None:
        """The tenant's spend by hour of ``day`` (default: its today), with running totals."""
        config = self.snapshot.tenants.get(name)
        if config is None:
            return None
        wanted = day or tenant_day(config.timezone, self.clock())
        spend = await self.ledger.hourly_spend(name, wanted)
        return self._hourly_json(config, wanted, spend.total, spend.extensions)

    @staticmethod
    def _hourly_json(
        config: TenantConfig,
        day: str,
        total: Mapping[int, int],
        extensions: Mapping[str, Mapping[int, int]],
    ) -> JSON:
        hours = []
        running = 0
        for hour in range(24):
            spent = total.get(hour, 0)
            running += spent
            hours.append({"hour": hour, "spent": spent, "cumulative": running})
        return {
            "tenant": config.name,
            "day": day,
            "timezone": config.timezone,
            "currency": config.currency,
            "daily_limit": config.daily_limit,
            "hours": hours,
            "extensions": {
                ext: {str(hour): spent for hour, spent in by_hour.items()}
                for ext, by_hour in extensions.items()
            },
        }

    async def calls(self, tenant: str | None = None, paging: Paging = FIRST_PAGE) -> JSON:
        """One page of the live calls (open reservations) of one tenant or all, longest-running
        first (then by tenant and call id).

        A tenant in shadow mode adds its calls held by the shadow counters (all of them, as its
        ``shadow`` row counts them), each marked ``shadow: true``; ``call_count`` counts both
        kinds, ``shadow_call_count`` the shadow ones, so that live-only totals stay at hand.
        """
        return paged(
            await self._cached(("calls", tenant), lambda: self._calls(tenant)), "calls", paging
        )

    async def _calls(self, tenant: str | None) -> JSON:
        now = self.clock()
        tenants = self.snapshot.tenants
        names = [tenant] if tenant is not None else list(tenants)
        found = await calls_in_progress(
            self.ledger,
            self.shadow_ledger,
            [
                (name, self.shadow_scope(config) is not None)
                for name in names
                if (config := tenants.get(name)) is not None
            ],
            slots=self._slots,
        )
        rows: list[JSON] = []
        for listed in found.calls:
            call = listed.call
            config = tenants[call.tenant]
            rows.append(
                {
                    "tenant": call.tenant,
                    "timezone": config.timezone,
                    "currency": config.currency,
                    "call_id": call.call_id,
                    "channel": call.channel,
                    "extension": call.extension,
                    "number": call.number,
                    "destination": call.destination,
                    "rate_per_minute": call.rate_per_minute,
                    "started": call.started,
                    "running_seconds": max(0, int(now - call.started)),
                    "reserved": call.reserved,
                    "max_seconds": call.max_seconds,
                    "deadline": call.deadline,
                    "shadow": listed.shadow,
                }
            )
        return {
            "now": now,
            "tenant": tenant,
            "call_count": len(rows),
            "shadow_call_count": sum(1 for row in rows if row["shadow"]),
            "calls": rows,
            "store_error": str(found.errors[0]) if found.errors else "",
        }

    async def security(self) -> JSON:
        return await self._cached(("security",), self._security)

    async def _security(self) -> JSON:
        now = self.clock()
        day = utc_day(now)
        result: JSON = {
            "now": now,
            "day": day,
            "blocked_ips": [],
            "scanner_user_agents": [],
            "scanner_ips": [],
            "top_refused_ips": [],
            "alerts_today": {},
            "events": [],
            "store_error": "",
        }
        try:
            blocks, agents, scanner_ips, ips, alerts, recent = await asyncio.gather(
                self.ledger.ip_blocks(now),
                self.feed.top("scanners", day),
                self.feed.top("scanner-ips", day),
                self.feed.top("ips", day),
                self.feed.alerts(None, day),
                self.feed.recent(None, EVENT_LIMIT),
            )
        except StorageError as exc:
            result["store_error"] = str(exc)
            return result
        result.update(
            blocked_ips=[asdict(block) for block in blocks],
            scanner_user_agents=[asdict(item) for item in agents],
            scanner_hits=sum(item.count for item in agents),
            scanner_ips=[asdict(item) for item in scanner_ips],
            top_refused_ips=[asdict(item) for item in ips],
            alerts_today=alerts,
            events=[event_json(event, self.tenant_zone(event.tenant)) for event in recent],
        )
        return result

    async def events(self, tenant: str | None = None, limit: int = EVENT_LIMIT) -> JSON:
        recent = await self.feed.recent(tenant, max(1, min(limit, 1000)))
        return {
            "tenant": tenant,
            "events": [event_json(event, self.tenant_zone(event.tenant)) for event in recent],
        }


def _extension_sort_key(sort: str) -> Callable[[JSON], Any]:
    if sort == "used":
        return lambda row: (row["used"] if row["used"] is not None else -1.0, row["name"])
    if sort == "name":
        return lambda row: row["name"]
    return lambda row: (row[sort], row["name"])
