"""The spend ledger on Redis: reservations, settlement, sweeping and the runtime counters.

``RedisLedger`` is the only component that holds money state. Every operation that changes money
is one Lua script (``scripts/*.lua``, each prefixed with ``scripts/lib.lua``) run atomically in
one round trip, so limits hold however many guards run at once, and it touches one Cluster slot
(see ``guard.ledger.keys``). The same class serves a plain Redis, Sentinel, Cluster and the
in-process ``memory://`` store: ``guard.ledger.storage.ledger_from_url`` picks the client.

Every operation is bounded by ``timeout`` (connect, send and answer together; a settle by at
least ``SETTLE_TIMEOUT``) and raises ``StorageError`` on any failure or timeout: the engine turns
it into ``store_unavailable``. The client does not retry (a retried script could run twice), and
a broken connection is replaced when it is next used, so the ledger recovers by itself once Redis
is back. On every store but ``memory://`` the scripts run on multiplexed connections
(``guard.ledger.multiplex``; ``guard.ledger.cluster``), everything else on redis-py's pool.
It never decides policy: limits and modes arrive in the request, reasons leave in the answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Iterable, Sequence
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
    BlockRule,
    ExtensionState,
    HourlySpend,
    IpBlock,
    LiveCall,
    RefusalCounts,
    Reservation,
    ReserveRequest,
    SettleOutcome,
    SettleResult,
    SliceCall,
    SliceExtension,
    SpendCounters,
    SweptCall,
    TenantCounters,
    ThreatKind,
    ThreatList,
)
from guard.money import MAX_AMOUNT, MAX_CALL_SECONDS, MAX_RATE

#: Default bound (seconds) of one ledger operation: Redis sits next to Guard, and a call must not
#: wait for a store that is not answering.
DEFAULT_TIMEOUT = 0.05
#: Longest billsec a settle charges: beyond a week the number is a bug, not a call.
MAX_SETTLE_SECONDS = 7 * 86_400
#: Upper bound for a concurrent-call limit (anything larger is a typo).
MAX_CONCURRENT = 1_000_000

#: Default length of the refusal windows, in minutes (the "HGC 200" pattern: 20 in 10 minutes).
REFUSAL_WINDOW_MINUTES = 10
MAX_WINDOW_MINUTES = 60
#: Longest timed IP block (a longer one is a permanent block).
MAX_BLOCK_SECONDS = 365 * 86_400
#: Bound of bulk perimeter reads and writes (threat lists), which never run on the hot path.
BULK_TIMEOUT = 10.0
#: Least bound of a settle: the call has ended and no caller waits for it, while a settle that
#: gives up leaves the sweeper to charge the whole reservation.
SETTLE_TIMEOUT = 1.0
#: Life of a threat list's staging set if its import dies before publishing it.
STAGING_TTL = 3600

RedisClient = Redis | RedisCluster
_T = TypeVar("_T")
_DAY = re.compile(r"[0-9]{8}")
_HOUR = re.compile(r"[0-9]{8}(?:[01][0-9]|2[0-3])")
_SCRIPTS = resources.files("guard.ledger") / "scripts"


class ScriptRunner(Protocol):
    """Runs the ledger's scripts instead of redis-py (``MultiplexedConnection``,
    ``ClusterScripts``): by SHA1, by source when Redis has not cached it."""

    async def evalsha(
        self, sha: str, source: str, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any: ...

    async def aclose(self) -> None: ...


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


def _local_hour(local_hour: str | None, now: float) -> str:
    """The hourly bucket (``YYYYMMDDHH``) a settle or sweep books into; UTC when not given."""
    if local_hour is None:
        return time.strftime("%Y%m%d%H", time.gmtime(now))
    if not _HOUR.fullmatch(local_hour):
        raise ValidationError("local_hour", f"not a YYYYMMDDHH hour: {local_hour!r}")
    return local_hour


def _extension_state(raw: dict[Any, Any]) -> ExtensionState:
    state = {_text(name): _text(value) for name, value in raw.items()}
    locked_at = state.get("locked_at")
    return ExtensionState(
        learned_user_agent=state.get("ua"),
        locked=state.get("locked") == "1",
        lock_reason=state.get("lock_reason", ""),
        locked_at=int(locked_at) / 1000 if locked_at else None,
    )


def _ip_block(ip: str, packed: str) -> IpBlock:
    """An ``IpBlock`` from its JSON in the blocks hash (``until`` 0 means until unblocked)."""
    info = json.loads(packed)
    ends = int(info["until"])
    return IpBlock(
        ip=ip,
        until=ends / 1000 if ends else None,
        reason=str(info["reason"]),
        at=int(info["at"]) / 1000,
        by=str(info["by"]),
        refusals=int(info["refusals"]),
    )


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
        scripts: ScriptRunner | None = None,
    ) -> None:
        """Wrap ``client``, which must decode responses (``decode_responses=True``).

        ``url`` (already masked) names the store in error messages; ``also_close`` lists what
        ``close`` must release besides the client. ``scripts``, multiplexed connections to the
        same Redis deployment, runs the Lua scripts (the hot path) instead of ``client``.
        """
        self._client = client
        self._scripts = scripts
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
        self._ip_blocks = self._script("ip_blocks")
        self._threat = self._script("threat")
        self._config_version = self._script("config_version")
        self._extend = self._script("extend")

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

    async def _guarded(
        self, what: str, operation: Awaitable[_T], *, bulk: bool = False, bound: float = 0.0
    ) -> _T:
        """Await ``operation`` within the timeout (``BULK_TIMEOUT`` for a ``bulk`` operation,
        never on the hot path; at least ``bound`` if given); any failure becomes
        ``StorageError``."""
        bound = max(BULK_TIMEOUT if bulk else bound, self._timeout)
        try:
            async with asyncio.timeout(bound):
                return await operation
        except TimeoutError as exc:
            raise StorageError(
                f"counter store {self._url}: {what} got no answer within {bound * 1000:g} ms"
            ) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StorageError(
                f"counter store {self._url}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _run(
        self,
        script: AsyncScript,
        what: str,
        script_keys: list[str],
        args: list[str | int],
        *,
        bound: float = 0.0,
    ) -> Any:
        return await self._guarded(what, self._call(script, script_keys, args), bound=bound)

    def _call(
        self, script: AsyncScript, script_keys: list[str], args: list[str | int]
    ) -> Awaitable[Any]:
        """One run of ``script``: on the multiplexed connection if there is one, else redis-py.
        Both answer NOSCRIPT (after SCRIPT FLUSH, a restart or a failover) by running the
        script's source, which caches it again (redis-py on every primary of a Cluster too)."""
        if self._scripts is None:
            return script(keys=script_keys, args=args)
        source = script.script
        text = source if isinstance(source, str) else bytes(source).decode("utf-8")
        return self._scripts.evalsha(script.sha, text, script_keys, args)

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
            ""
            if req.slice_seconds is None
            else _bounded("slice_seconds", req.slice_seconds, 1, MAX_CALL_SECONDS),
        ]
        reply = await self._run(
            self._reserve, "reserve", [base, keys.extension_state_key(base, req.extension)], args
        )
        reason, reserved, max_seconds, existing, locked_now = reply[:5]
        ext_spent, tenant_spent = reply[5:7] or (0, 0)
        return Reservation(
            reason=Reason(reason),
            reserved=int(reserved),
            max_seconds=int(max_seconds),
            existing=bool(existing),
            locked_now=bool(locked_now),
            ext_spent=int(ext_spent),
            tenant_spent=int(tenant_spent),
            cap_seconds=int(reply[7]) if len(reply) > 7 else 0,
        )

    async def settle(
        self,
        tenant: str,
        call_id: str,
        billsec: int,
        now: float,
        *,
        local_hour: str | None = None,
        probe: bool = False,
    ) -> SettleResult:
        """Turn the call's reservation into spend at its real cost, exactly once.

        The cost is ``call_cost`` of ``billsec`` (clamped to ``[0, MAX_SETTLE_SECONDS]``) at the
        reserved rate, booked on the reservation's own day; the call slot is freed. A cost above
        the reservation is charged in full and flagged ``over_reservation``. A repeat answers
        ``ALREADY_SETTLED`` and changes nothing; an unknown call id is recorded in the orphans
        list (``UNKNOWN_CALL``, once); a call the sweeper charged in full is corrected to the real
        cost (``SETTLED_AFTER_SWEEP``, ``reserved`` is what had been charged).
        The cost also lands in the hourly spend bucket of ``local_hour`` (see ``hourly_spend``).
        With ``probe``, a call this ledger never reserved (or only recorded as unknown) answers
        ``UNKNOWN_CALL`` and is not recorded: the engine asks the live ledger, then the shadow
        one, in one round trip for a live call. It waits at least ``SETTLE_TIMEOUT``.
        """
        if not call_id:
            raise ValidationError("call_id", "must not be empty")
        clamped = min(max(int(billsec), 0), MAX_SETTLE_SECONDS)
        outcome, extension, cost, reserved, over = await self._run(
            self._settle,
            "settle",
            [self._base(tenant)],
            [
                call_id,
                clamped,
                _epoch_ms("now", now),
                _local_hour(local_hour, now),
                "1" if probe else "0",
            ],
            bound=SETTLE_TIMEOUT,
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

    async def sweep(
        self, tenant: str, now: float, limit: int = 1000, *, local_hour: str | None = None
    ) -> list[SweptCall]:
        """Charge in full up to ``limit`` reservations whose deadline has passed.

        Each expired call is swept exactly once even when several guards sweep at the same time;
        a settle that arrives later corrects the charge to the real cost. The charges land in
        the hourly spend bucket of ``local_hour`` (see ``hourly_spend``).
        """
        flat = await self._run(
            self._sweep,
            "sweep",
            [self._base(tenant)],
            [
                _epoch_ms("now", now),
                _bounded("limit", limit, 1, 100_000),
                _local_hour(local_hour, now),
            ],
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
                    slice_seconds=int(r.get("slice", 0)),
                    cap_seconds=int(r.get("cap", 0)),
                )
            )
        return sorted(calls, key=lambda call: (call.started, call.call_id))

    # --- interval reservations (scripts/extend.lua) -------------------------------------------

    async def due_slices(
        self, tenant: str, until: float, *, alive_seconds: float = 0.0, limit: int = 1000
    ) -> list[SliceCall]:
        """The tenant's interval reservations whose money runs out by ``until`` (epoch seconds),
        soonest first. ``alive_seconds > 0`` also tells ``reserve`` that an extender serves the
        tenant for that long: only then does it grant interval reservations."""
        flat = await self._run(
            self._extend,
            "list slices",
            [self._base(tenant)],
            [
                "due",
                _epoch_ms("until", until),
                _bounded("limit", limit, 1, 100_000),
                int(alive_seconds * 1000),
            ],
        )
        due = []
        for i in range(0, len(flat), 2):
            r = json.loads(flat[i + 1])
            due.append(
                SliceCall(
                    tenant=tenant,
                    call_id=str(flat[i]),
                    extension=r["ext"],
                    started=int(r["started"]) / 1000,
                    max_seconds=int(r["max_seconds"]),
                    reserved=int(r["reserved"]),
                    slice_seconds=int(r["slice"]),
                    cap_seconds=int(r["cap"]),
                    ends_ms=int(r["ends"]),
                    final=str(r.get("final", "")),
                )
            )
        return sorted(due, key=lambda call: (call.ends_ms, call.call_id))

    async def extend_slice(
        self,
        call: SliceCall,
        now: float,
        *,
        ext_daily_limit: int | None,
        tenant_daily_limit: int | None,
        deny: str = "",
    ) -> SliceExtension:
        """Add the next slice to ``call``'s reservation, atomically, if the budgets allow.

        Both daily limits are checked against the spend and open reservations of the
        reservation's day, as ``reserve`` does; the reservation grows by the cost of what is
        affordable of the next slice (up to the call's cap) and its deadlines move. ``deny``
        refuses at once (the configuration no longer allows the call). A refusal is final. The
        extension applies only if the slice still ends at ``call.ends_ms``: of two guards
        extending the same call at once, one extends and the other gets ``stale``.
        """
        base = self._base(call.tenant)
        outcome, max_seconds, ends_ms, reserved = await self._run(
            self._extend,
            "extend slice",
            [base, keys.extension_state_key(base, call.extension)],
            [
                "extend",
                call.call_id,
                call.ends_ms,
                _epoch_ms("now", now),
                _optional("ext_daily_limit", ext_daily_limit, MAX_AMOUNT),
                _optional("tenant_daily_limit", tenant_daily_limit, MAX_AMOUNT),
                deny,
            ],
        )
        return SliceExtension(str(outcome), int(max_seconds), int(ends_ms), int(reserved))

    async def claim_cut(self, tenant: str, call_id: str, ends_ms: int) -> bool:
        """Claim the cut of a slice that still ends at ``ends_ms``: true for exactly one caller,
        and the reservation can no longer be extended."""
        claimed = await self._run(
            self._extend, "claim cut", [self._base(tenant)], ["cut", call_id, ends_ms]
        )
        return bool(claimed)

    async def restore_cut(self, tenant: str, call_id: str, ends_ms: int) -> None:
        """Give back a claimed cut that could not be carried out, for the next try."""
        await self._run(
            self._extend, "restore cut", [self._base(tenant)], ["restore", call_id, ends_ms]
        )

    async def extension_state(self, tenant: str, extension: str) -> ExtensionState:
        """The extension's learned User-Agent and runtime lock."""
        raw = await self._guarded(
            "read extension state",
            self._client.hgetall(keys.extension_state_key(self._base(tenant), extension)),
        )
        return _extension_state(raw)

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
        self,
        tenant: str,
        extension: str,
        source_ip: str,
        reason: Reason,
        now: float,
        *,
        block: BlockRule | None = None,
        window_minutes: int = REFUSAL_WINDOW_MINUTES,
    ) -> RefusalCounts:
        """Count one refused attempt and return the counts of the sliding window.

        The source IP is counted across all tenants (a scanner tries many), the extension within
        its tenant: two scripts on two slots, sent together (the IP only when ``tenant`` is empty:
        a tenant Guard does not know). With ``block``, the IP's script also
        blocks the IP, atomically with the count, when ``block.threshold`` refusals are in the
        window or at once when ``block.immediate`` (``blocked_now`` is then true for exactly one
        refusal across every guard). Windows have minute resolution and expire on their own.
        """
        at = _epoch_ms("now", now)
        window = _bounded("window_minutes", window_minutes, 1, MAX_WINDOW_MINUTES)
        perimeter = keys.perimeter_base(self._prefix)
        ip_keys = [keys.ip_refusals_key(self._prefix, source_ip)]
        ip_args: list[str | int] = [at, str(reason), window]
        if block is not None:
            ip_keys += [f"{perimeter}:blocks", f"{perimeter}:block-expiry", self._blocks_version]
            ip_args += [
                source_ip,
                _bounded("threshold", block.threshold, 0, 1_000_000),
                _bounded("block_seconds", block.seconds, 1, MAX_BLOCK_SECONDS) * 1000,
                "1" if block.immediate else "0",
            ]
        scripts = [self._call(self._refusal, ip_keys, ip_args)]
        if tenant:
            ext_key = keys.extension_refusals_key(self._base(tenant), extension)
            scripts.append(self._call(self._refusal, [ext_key], [at, str(reason), window]))
        replies = await self._guarded("record refusal", asyncio.gather(*scripts))
        total, same, blocked_now, packed = replies[0]
        return RefusalCounts(
            ip=int(total),
            ip_same_reason=int(same),
            extension=int(replies[1][0]) if tenant else 0,
            block=_ip_block(source_ip, packed) if packed else None,
            blocked_now=bool(blocked_now),
        )

    # --- perimeter: IP blocks, threat lists, alert markers (global keys, see ``keys``) -------

    @property
    def _blocks_version(self) -> str:
        return f"{keys.perimeter_base(self._prefix)}:blocks-version"

    def _blocks_keys(self) -> list[str]:
        perimeter = keys.perimeter_base(self._prefix)
        return [f"{perimeter}:blocks", f"{perimeter}:block-expiry", self._blocks_version]

    async def block_ip(
        self, ip: str, *, seconds: int | None, reason: str, by: str, now: float
    ) -> bool:
        """Block ``ip`` for ``seconds`` (``None``: until unblocked), replacing any block.

        Returns whether the IP was not blocked before.
        """
        at = _epoch_ms("now", now)
        length = None if seconds is None else _bounded("seconds", seconds, 1, MAX_BLOCK_SECONDS)
        ends = 0 if length is None else at + length * 1000
        created = await self._run(
            self._ip_blocks,
            "block IP",
            self._blocks_keys(),
            ["block", ip, ends, reason, at, by],
        )
        return bool(created)

    async def unblock_ip(self, ip: str, *, now: float) -> bool:
        """Lift the block of ``ip`` and reset its refusal window; returns whether it was blocked."""
        was = await self._run(
            self._ip_blocks,
            "unblock IP",
            [*self._blocks_keys(), keys.ip_refusals_key(self._prefix, ip)],
            ["unblock", ip, _epoch_ms("now", now)],
        )
        return bool(was)

    async def ip_blocks(self, now: float) -> list[IpBlock]:
        """Every active block, sorted by IP text; expired blocks are purged on the way."""
        flat = await self._run(
            self._ip_blocks, "list IP blocks", self._blocks_keys(), ["list", _epoch_ms("now", now)]
        )
        found = [_ip_block(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]
        return sorted((b for b in found if b.active(now)), key=lambda b: b.ip)

    async def perimeter_versions(self) -> tuple[int, int]:
        """The versions of the IP blocks and of the threat lists (one round trip: one slot)."""
        perimeter = keys.perimeter_base(self._prefix)
        blocks, threats = await self._guarded(
            "read perimeter versions",
            self._client.mget([self._blocks_version, f"{perimeter}:threats-version"]),
        )
        return int(blocks or 0), int(threats or 0)

    async def import_threat_list(
        self,
        name: str,
        kind: ThreatKind,
        entries: Iterable[str],
        *,
        replace: bool,
        source: str,
        by: str,
        now: float,
        chunk: int = 5_000,
    ) -> int:
        """Publish threat list ``name`` atomically: staged under a temporary key, then renamed
        (``replace``) or merged into the list. Returns the entries in the list afterwards.

        A list name belongs to one kind; importing it as the other raises ``ValidationError``.
        """
        perimeter = keys.perimeter_base(self._prefix)
        target = keys.threat_key(self._prefix, kind.value, name)
        staging = f"{target}:tmp:{uuid.uuid4().hex}"
        batch: list[str] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= chunk:
                await self._stage(staging, batch)
                batch = []
        if batch:
            await self._stage(staging, batch)
        meta = json.dumps({"at": _epoch_ms("now", now), "source": source[:200], "by": by[:64]})
        count = await self._run(
            self._threat,
            "publish threat list",
            [staging, target, f"{perimeter}:threats", f"{perimeter}:threats-version"],
            ["commit", name, kind.value, "1" if replace else "0", meta],
        )
        if int(count) < 0:
            raise ValidationError("name", f"threat list {name!r} exists with the other kind")
        return int(count)

    async def _stage(self, staging: str, batch: list[str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(staging, *batch)
        pipe.expire(staging, STAGING_TTL)
        await self._guarded("stage threat list", pipe.execute(), bulk=True)

    async def clear_threat_list(self, name: str, kind: ThreatKind) -> bool:
        """Delete threat list ``name``; returns whether it existed."""
        perimeter = keys.perimeter_base(self._prefix)
        target = keys.threat_key(self._prefix, kind.value, name)
        found = await self._run(
            self._threat,
            "clear threat list",
            [f"{target}:tmp", target, f"{perimeter}:threats", f"{perimeter}:threats-version"],
            ["clear", name, kind.value],
        )
        if int(found) < 0:
            raise ValidationError("name", f"threat list {name!r} exists with the other kind")
        return bool(found)

    async def threat_lists(self) -> list[ThreatList]:
        """The imported threat lists, by name."""
        raw = await self._guarded(
            "list threat lists",
            self._client.hgetall(f"{keys.perimeter_base(self._prefix)}:threats"),
        )
        lists = []
        for name, packed in raw.items():
            info = json.loads(packed)
            lists.append(
                ThreatList(
                    name=_text(name),
                    kind=ThreatKind(info["kind"]),
                    entries=int(info["entries"]),
                    imported_at=int(info["at"]) / 1000,
                    source=str(info.get("source", "")),
                    by=str(info.get("by", "")),
                )
            )
        return sorted(lists, key=lambda item: item.name)

    async def threat_entries(self, kind: ThreatKind) -> dict[str, set[str]]:
        """Every entry of every list of ``kind``, by list name (bulk read, off the hot path)."""
        names = [item.name for item in await self.threat_lists() if item.kind is kind]
        found: dict[str, set[str]] = {}
        for name in names:
            members = await self._guarded(
                "read threat list",
                self._client.smembers(keys.threat_key(self._prefix, kind.value, name)),
                bulk=True,
            )
            found[name] = {_text(member) for member in members}
        return found

    async def claim_once(self, marker: str, seconds: int) -> bool:
        """Set the marker ``marker`` for ``seconds`` unless it exists: true for the first caller
        only, across every guard (alert de-duplication)."""
        created = await self._guarded(
            "claim alert marker",
            self._client.set(
                keys.alert_key(self._prefix, marker),
                "1",
                nx=True,
                ex=_bounded("seconds", seconds, 1, 30 * 86_400),
            ),
        )
        return bool(created)

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
        if self._scripts is not None:
            await self._scripts.aclose()
        await self._client.aclose()
        for other in self._also_close:
            await other.aclose()

    @property
    def client(self) -> RedisClient:
        """The Redis client, for the event feed's writes and the dashboard's reads (not money)."""
        return self._client

    async def hourly_spend(self, tenant: str, day: str) -> HourlySpend:
        """The spend of the tenant and of each extension in each hour of ``day``."""
        if not _DAY.fullmatch(day):
            raise ValidationError("day", f"not a YYYYMMDD day: {day!r}")
        raw = await self._guarded(
            "read hourly spend", self._client.hgetall(f"{self._base(tenant)}:hourly:{day}")
        )
        total: dict[int, int] = {}
        per_ext: dict[str, dict[int, int]] = {}
        for name, value in raw.items():
            hour, sep, ext = _text(name).partition(":ext:")
            if sep:
                per_ext.setdefault(ext, {})[int(hour)] = int(value)
            else:
                total[int(hour)] = int(value)
        return HourlySpend(
            tenant=tenant,
            day=day,
            total=dict(sorted(total.items())),
            extensions={ext: dict(sorted(hours.items())) for ext, hours in sorted(per_ext.items())},
        )

    async def extension_states(
        self, tenant: str, extensions: Sequence[str]
    ) -> dict[str, ExtensionState]:
        """``extension_state`` of many extensions of one tenant in one round trip."""
        base = self._base(tenant)
        names = list(dict.fromkeys(extensions))
        if not names:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.extension_state_key(base, name))
        replies = await self._guarded("read extension states", pipe.execute())
        return {name: _extension_state(raw) for name, raw in zip(names, replies, strict=True)}
