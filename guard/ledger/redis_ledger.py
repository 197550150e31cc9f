"""The spend ledger on Redis: reservations, settlement, sweeping and the runtime counters.

``RedisLedger`` is the only component that holds money state. Every operation that changes money
is one Lua script (``scripts/*.lua``, each prefixed with ``scripts/lib.lua``) run atomically in
one round trip, so limits hold however many guards run at once, and it touches one Cluster slot
(see ``guard.ledger.keys``). The same class serves a plain Redis, Sentinel, Cluster and the
in-process ``memory://`` store: ``guard.ledger.storage.ledger_from_url`` picks the client.

Every operation is bounded by ``timeout`` (connect, send and answer together) and raises
``StorageError`` on any failure or timeout: the engine turns it into ``store_unavailable``. The
client does not retry (a retried script could run twice), and a broken connection is replaced
when it is next taken from the pool, so the ledger recovers by itself once Redis is back.
It never decides policy: limits and modes arrive in the request, reasons leave in the answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Awaitable, Sequence
from importlib import resources
from types import TracebackType
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from guard.domain import Reason, UaLockMode
from guard.errors import StorageError, ValidationError
from guard.ledger import keys
from guard.ledger.types import (
    ExtensionState,
    LiveCall,
    RefusalCounts,
    Reservation,
    ReserveRequest,
    SettleOutcome,
    SettleResult,
    SpendCounters,
    SweptCall,
    TenantCounters,
)
from guard.money import MAX_AMOUNT, MAX_CALL_SECONDS, MAX_RATE

#: Default bound (seconds) of one ledger operation: Redis sits next to Guard, and a call must not
#: wait for a store that is not answering.
DEFAULT_TIMEOUT = 0.05
#: Longest billsec a settle charges: beyond a week the number is a bug, not a call.
MAX_SETTLE_SECONDS = 7 * 86_400
#: Upper bound for a concurrent-call limit (anything larger is a typo).
MAX_CONCURRENT = 1_000_000

RedisClient = Redis | RedisCluster
_T = TypeVar("_T")
_DAY = re.compile(r"[0-9]{8}")
_SCRIPTS = resources.files("guard.ledger") / "scripts"


class Closable(Protocol):
    """Something else the ledger owns and closes with its client (e.g. the Sentinel clients)."""

    async def aclose(self) -> None: ...


def _script_source(name: str) -> str:
    return (_SCRIPTS / "lib.lua").read_text("utf-8") + (_SCRIPTS / f"{name}.lua").read_text("utf-8")


def _bounded(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValidationError(field, f"{value} is outside [{low}, {high}]")
    return value


def _optional(field: str, value: int | None, high: int) -> str:
    return "" if value is None else str(_bounded(field, value, 0, high))


def _epoch_ms(field: str, now: float) -> int:
    if not math.isfinite(now) or now < 0:
        raise ValidationError(field, f"not a time: {now!r}")
    return int(now * 1000)


def _text(value: bytes | str) -> str:
    """A reply as text (the client decodes replies; this only narrows the type)."""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisLedger:
    """Guard's spend ledger on one Redis deployment (see the module docstring)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "guard",
        timeout: float = DEFAULT_TIMEOUT,
        url: str = "redis",
        also_close: Sequence[Closable] = (),
    ) -> None:
        """Wrap ``client``, which must decode responses (``decode_responses=True``).

        ``url`` (already masked) names the store in error messages; ``also_close`` lists what
        ``close`` must release besides the client.
        """
        self._client = client
        self._prefix = keys.check_prefix(prefix)
        self._timeout = timeout
        self._url = url
        self._also_close = tuple(also_close)
        self._reserve = self._script("reserve")
        self._settle = self._script("settle")
        self._sweep = self._script("sweep")
        self._counters = self._script("counters")
        self._extension = self._script("extension")
        self._refusal = self._script("refusal")
        self._config_version = self._script("config_version")

    def _script(self, name: str) -> AsyncScript:
        return self._client.register_script(_script_source(name))

    @property
    def url(self) -> str:
        """The store's URL with any password masked, for logs and the dashboard."""
        return self._url

    @property
    def prefix(self) -> str:
        return self._prefix

    async def __aenter__(self) -> RedisLedger:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _guarded(self, what: str, operation: Awaitable[_T]) -> _T:
        """Await ``operation`` within the timeout; any failure becomes ``StorageError``."""
        try:
            async with asyncio.timeout(self._timeout):
                return await operation
        except TimeoutError as exc:
            raise StorageError(
                f"counter store {self._url}: {what} got no answer within "
                f"{self._timeout * 1000:g} ms"
            ) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StorageError(
                f"counter store {self._url}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _run(
        self, script: AsyncScript, what: str, script_keys: list[str], args: list[str | int]
    ) -> Any:
        # redis-py answers NOSCRIPT (after SCRIPT FLUSH, a restart or a failover) by loading the
        # script and running it again, on every primary of a Cluster too.
        return await self._guarded(what, script(keys=script_keys, args=args))

    def _base(self, tenant: str) -> str:
        if not tenant:
            raise ValidationError("tenant", "must not be empty")
        return keys.tenant_base(self._prefix, tenant)

    async def reserve(self, req: ReserveRequest) -> Reservation:
        """Reserve budget and a call slot for ``req.call_id``, in one atomic script.

        In order: a call id that already holds a reservation gets it back (``existing=True``, an
        idempotent retry); a call id that was already settled, swept or reported as unknown, or
        that is reserved for another extension, is refused with ``bad_request`` (``existing=True``):
        it can never reserve twice. Then the extension's runtime lock (``extension_locked``), the
        learned User-Agent when ``ua_mode`` is ``learn`` (the first one seen is stored; a different
        one locks the extension: ``user_agent_mismatch``, ``locked_now=True``), the concurrent
        limits (extension before tenant), and the daily budgets: the call may last
        ``max_affordable_seconds(rate, min(ext left, tenant left), max_call_seconds)`` and reserves
        ``call_cost`` of that; 0 seconds refuses with the limit that binds (the extension's when
        both do). A free destination reserves 0 but still takes a call slot.
        """
        if not req.call_id:
            raise ValidationError("call_id", "must not be empty")
        if not _DAY.fullmatch(req.day):
            raise ValidationError("day", f"not a YYYYMMDD day: {req.day!r}")
        base = self._base(req.tenant)
        rate = req.rate
        args: list[str | int] = [
            req.call_id,
            req.extension,
            req.day,
            _epoch_ms("now", req.now),
            _bounded("rate_per_minute", rate.rate_per_minute, 0, MAX_RATE),
            _bounded("connect_fee", rate.connect_fee, 0, MAX_RATE),
            _bounded("initial_increment", rate.initial_increment, 1, MAX_CALL_SECONDS),
            _bounded("subsequent_increment", rate.subsequent_increment, 1, MAX_CALL_SECONDS),
            _optional("ext_daily_limit", req.ext_daily_limit, MAX_AMOUNT),
            _optional("tenant_daily_limit", req.tenant_daily_limit, MAX_AMOUNT),
            _optional("ext_concurrent_limit", req.ext_concurrent_limit, MAX_CONCURRENT),
            _optional("tenant_concurrent_limit", req.tenant_concurrent_limit, MAX_CONCURRENT),
            _bounded("max_call_seconds", req.max_call_seconds, 1, MAX_CALL_SECONDS),
            _bounded("grace_seconds", req.grace_seconds, 0, MAX_CALL_SECONDS),
            "1" if req.ua_mode == UaLockMode.LEARN else "0",
            req.user_agent,
            req.number,
            rate.name,
            req.channel,
            req.source_ip,
        ]
        reason, reserved, max_seconds, existing, locked_now = await self._run(
            self._reserve, "reserve", [base, keys.extension_state_key(base, req.extension)], args
        )
        return Reservation(
            reason=Reason(reason),
            reserved=int(reserved),
            max_seconds=int(max_seconds),
            existing=bool(existing),
            locked_now=bool(locked_now),
        )

    async def settle(self, tenant: str, call_id: str, billsec: int, now: float) -> SettleResult:
        """Turn the call's reservation into spend at its real cost, exactly once.

        The cost is ``call_cost`` of ``billsec`` (clamped to ``[0, MAX_SETTLE_SECONDS]``) at the
        reserved rate, booked on the reservation's own day; the call slot is freed. A cost above
        the reservation is charged in full and flagged ``over_reservation``. A repeat answers
        ``ALREADY_SETTLED`` and changes nothing; an unknown call id is recorded in the orphans
        list (``UNKNOWN_CALL``, once); a call the sweeper charged in full is corrected to the real
        cost (``SETTLED_AFTER_SWEEP``, ``reserved`` is what had been charged).
        """
        if not call_id:
            raise ValidationError("call_id", "must not be empty")
        clamped = min(max(int(billsec), 0), MAX_SETTLE_SECONDS)
        outcome, extension, cost, reserved, over = await self._run(
            self._settle,
            "settle",
            [self._base(tenant)],
            [call_id, clamped, _epoch_ms("now", now)],
        )
        return SettleResult(
            outcome=SettleOutcome(outcome),
            tenant=tenant,
            call_id=call_id,
            extension=str(extension),
            cost=int(cost),
            reserved=int(reserved),
            over_reservation=bool(over),
        )

    async def sweep(self, tenant: str, now: float, limit: int = 1000) -> list[SweptCall]:
        """Charge in full up to ``limit`` reservations whose deadline has passed.

        Each expired call is swept exactly once even when several guards sweep at the same time;
        a settle that arrives later corrects the charge to the real cost.
        """
        flat = await self._run(
            self._sweep,
            "sweep",
            [self._base(tenant)],
            [_epoch_ms("now", now), _bounded("limit", limit, 1, 100_000)],
        )
        return [
            SweptCall(
                tenant=tenant,
                call_id=str(flat[i]),
                extension=str(flat[i + 1]),
                charged=int(flat[i + 2]),
                deadline=int(flat[i + 3]) / 1000,
            )
            for i in range(0, len(flat), 4)
        ]

    async def counters(self, tenant: str, day: str) -> TenantCounters:
        """The tenant's spend and open reservations on ``day``, and its live calls now."""
        if not _DAY.fullmatch(day):
            raise ValidationError("day", f"not a YYYYMMDD day: {day!r}")
        day_flat, live_flat = await self._run(
            self._counters, "read counters", [self._base(tenant)], [day]
        )
        money = _pairs(day_flat)
        live = _pairs(live_flat)
        per_ext: dict[str, dict[str, int]] = {}
        for field, value in money.items():
            kind, sep, ext = field.partition(":ext:")
            if sep and kind in ("spent", "reserved"):
                per_ext.setdefault(ext, {})[kind] = int(value)
        for field, value in live.items():
            if field.startswith("ext:"):
                per_ext.setdefault(field[4:], {})["live_calls"] = int(value)
        return TenantCounters(
            tenant=tenant,
            day=day,
            total=SpendCounters(
                spent=int(money.get("spent", 0)),
                reserved=int(money.get("reserved", 0)),
                live_calls=int(live.get("tenant", 0)),
            ),
            extensions={ext: SpendCounters(**values) for ext, values in sorted(per_ext.items())},
        )

    async def live_calls(self, tenant: str) -> list[LiveCall]:
        """The tenant's open reservations, oldest first."""
        packed = await self._guarded(
            "list live calls", self._client.hgetall(f"{self._base(tenant)}:calls")
        )
        calls = []
        for call_id, text in packed.items():
            r = json.loads(text)
            calls.append(
                LiveCall(
                    tenant=tenant,
                    call_id=_text(call_id),
                    extension=r["ext"],
                    number=r["number"],
                    destination=r["dest"],
                    rate_per_minute=int(r["rpm"]),
                    started=int(r["started"]) / 1000,
                    reserved=int(r["reserved"]),
                    max_seconds=int(r["max_seconds"]),
                    deadline=int(r["deadline"]) / 1000,
                    channel=r["channel"],
                )
            )
        return sorted(calls, key=lambda call: (call.started, call.call_id))

    async def extension_state(self, tenant: str, extension: str) -> ExtensionState:
        """The extension's learned User-Agent and runtime lock."""
        raw = await self._guarded(
            "read extension state",
            self._client.hgetall(keys.extension_state_key(self._base(tenant), extension)),
        )
        state = {_text(name): _text(value) for name, value in raw.items()}
        locked_at = state.get("locked_at")
        return ExtensionState(
            learned_user_agent=state.get("ua"),
            locked=state.get("locked") == "1",
            lock_reason=state.get("lock_reason", ""),
            locked_at=int(locked_at) / 1000 if locked_at else None,
        )

    async def lock_extension(
        self, tenant: str, extension: str, reason: str, *, now: float | None = None
    ) -> bool:
        """Lock the extension until an admin unlocks it; returns whether it was locked already."""
        at = time.time() if now is None else now
        was_locked = await self._run(
            self._extension,
            "lock extension",
            [keys.extension_state_key(self._base(tenant), extension)],
            ["lock", reason, _epoch_ms("now", at)],
        )
        return bool(was_locked)

    async def unlock_extension(
        self, tenant: str, extension: str, *, forget_ua: bool = False
    ) -> bool:
        """Clear the runtime lock (and the learned User-Agent if ``forget_ua``).

        Returns whether the extension was locked.
        """
        was_locked = await self._run(
            self._extension,
            "unlock extension",
            [keys.extension_state_key(self._base(tenant), extension)],
            ["unlock", "1" if forget_ua else "0"],
        )
        return bool(was_locked)

    async def record_refusal(
        self, tenant: str, extension: str, source_ip: str, reason: Reason, now: float
    ) -> RefusalCounts:
        """Count one refused attempt and return the counts of the last 10 minutes.

        The source IP is counted across all tenants (a scanner tries many), the extension within
        its tenant. Windows have minute resolution and expire on their own.
        """
        at = _epoch_ms("now", now)
        ip_counts, ext_counts = await self._guarded(
            "record refusal",
            asyncio.gather(
                self._refusal(
                    keys=[keys.ip_refusals_key(self._prefix, source_ip)], args=[at, str(reason)]
                ),
                self._refusal(
                    keys=[keys.extension_refusals_key(self._base(tenant), extension)],
                    args=[at, str(reason)],
                ),
            ),
        )
        return RefusalCounts(
            ip=int(ip_counts[0]), ip_same_reason=int(ip_counts[1]), extension=int(ext_counts[0])
        )

    async def config_version(self) -> int:
        """The configuration version (0 before the first bump)."""
        value = await self._guarded(
            "read config version", self._client.get(keys.config_version_key(self._prefix))
        )
        return int(value) if value else 0

    async def bump_config_version(self, at_least: int = 0) -> int:
        """Move the configuration version to ``max(current + 1, at_least)`` and return it."""
        version = await self._run(
            self._config_version,
            "bump config version",
            [keys.config_version_key(self._prefix)],
            [_bounded("at_least", at_least, 0, 2**53)],
        )
        return int(version)

    async def ping(self) -> float:
        """Round-trip time to the store, in seconds."""
        started = time.perf_counter()
        await self._guarded("ping", self._client.ping())
        return time.perf_counter() - started

    async def close(self) -> None:
        """Release the connections."""
        await self._client.aclose()
        for other in self._also_close:
            await other.aclose()
