"""The engine end to end on the real Redis: policy, one reservation, settle, fail modes, events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from factories import (
    LONDON,
    PARIS,
    UK_MOBILE,
    make_attempt,
    make_extension,
    make_snapshot,
    make_tenant,
    money,
)

from guard.domain import FailMode, Reason, Result, UaLockMode
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import StorageError
from guard.events import Event, EventBus, EventKind
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.types import SettleOutcome
from guard.money import call_cost
from guard.snapshot import Snapshot

NOON = datetime(2024, 6, 5, 12, 0, tzinfo=UTC).timestamp()  # a Wednesday, inside any window


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _bus() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.add_sink(seen.append)
    return bus, seen


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


def _engine(ledger: Any, snapshot: Snapshot | None = None, **kw: Any) -> tuple[Engine, list[Event]]:
    bus, seen = _bus()
    engine = Engine(
        SnapshotHolder(snapshot or make_snapshot()),
        ledger,
        bus,
        EngineSettings(grace_seconds=30, fail_open_max_seconds=120, emergency_max_seconds=7200),
        clock=kw.pop("clock", Clock()),
    )
    return engine, seen


async def test_local_call_is_allowed_and_reserves_its_longest_call(ledger: RedisLedger) -> None:
    engine, events = _engine(ledger)
    decision = await engine.authorize(make_attempt(number=LONDON, call_id="c1"))
    assert decision.result is Result.ALLOW
    assert decision.reason is Reason.ALLOWED
    # 5.00 of budget buys far more than the tenant's 3600 s cap at 0.01/min.
    assert decision.max_seconds == 3600
    assert decision.destination is not None and decision.destination.prefix == "4420"
    assert decision.reserved == call_cost(decision.destination, 3600) == money("0.60")
    calls = await ledger.live_calls("acme")
    assert [c.call_id for c in calls] == ["c1"]
    assert events == []


async def test_budget_bounds_max_seconds_then_refuses(ledger: RedisLedger) -> None:
    engine, events = _engine(ledger)
    first = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="m1"))
    # 1001 has 5.00 a day; mobile costs 0.10/min in 60 s steps: 50 minutes.
    assert (first.result, first.max_seconds, first.reserved) == (Result.ALLOW, 3000, money("5"))
    second = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="m2"))
    assert (second.result, second.reason) == (Result.DENY, Reason.DAILY_LIMIT_EXTENSION)
    assert [e.reason for e in events] == [Reason.DAILY_LIMIT_EXTENSION]
    settled = await engine.settle("acme", "m1", 61)
    assert (settled.outcome, settled.cost) == (SettleOutcome.SETTLED, money("0.20"))
    third = await engine.authorize(make_attempt(number=UK_MOBILE, call_id="m3"))
    assert third.result is Result.ALLOW and third.max_seconds == 2880


async def test_policy_refusal_emits_one_event_and_is_counted(ledger: RedisLedger) -> None:
    engine, events = _engine(ledger)
    decision = await engine.authorize(make_attempt(number=PARIS, user_agent="friendly-scanner"))
    assert (decision.result, decision.reason) == (Result.DENY, Reason.SCANNER_USER_AGENT)
    await engine.drain()
    assert len(events) == 1 and events[0].kind == EventKind.REFUSED
    counts = await ledger.record_refusal("acme", "1001", "192.0.2.10", Reason.NO_RATE, NOON)
    assert counts.extension == 2  # the engine's count plus this one
    assert await ledger.live_calls("acme") == []


async def test_settle_is_exactly_once_and_orphans_raise_an_event(ledger: RedisLedger) -> None:
    engine, events = _engine(ledger)
    await engine.authorize(make_attempt(number=LONDON, call_id="s1"))
    assert (await engine.settle("acme", "s1", 30)).outcome is SettleOutcome.SETTLED
    assert (await engine.settle("acme", "s1", 30)).outcome is SettleOutcome.ALREADY_SETTLED
    orphan = await engine.settle("acme", "never-reserved", 30)
    assert orphan.outcome is SettleOutcome.UNKNOWN_CALL
    assert [e.kind for e in events] == [EventKind.ORPHAN_SETTLE]
    counters = await ledger.counters("acme", "20240605")
    assert counters.total.spent == money("0.01") and counters.total.reserved == 0


async def test_learned_user_agent_mismatch_locks_the_extension(ledger: RedisLedger) -> None:
    snapshot = make_snapshot(extensions=[make_extension("1001", ua_mode=UaLockMode.LEARN)])
    engine, events = _engine(ledger, snapshot)
    ok = await engine.authorize(make_attempt(number=LONDON, call_id="u1", user_agent="Yealink"))
    assert ok.result is Result.ALLOW
    stolen = await engine.authorize(
        make_attempt(number=LONDON, call_id="u2", user_agent="MicroSIP/3.21")
    )
    assert stolen.reason is Reason.USER_AGENT_MISMATCH
    assert [e.kind for e in events] == [EventKind.LOCKED, EventKind.REFUSED]
    again = await engine.authorize(make_attempt(number=LONDON, call_id="u3", user_agent="Yealink"))
    assert again.reason is Reason.EXTENSION_LOCKED
    assert (await ledger.extension_state("acme", "1001")).locked


async def test_the_day_is_the_tenants_day(ledger: RedisLedger) -> None:
    # 03:30 UTC on 6 June is still 5 June in New York.
    clock = Clock(datetime(2024, 6, 6, 3, 30, tzinfo=UTC).timestamp())
    snapshot = make_snapshot(timezone="America/New_York")
    engine, _ = _engine(ledger, snapshot, clock=clock)
    assert (await engine.authorize(make_attempt(number=LONDON, call_id="d1"))).allowed
    assert (await ledger.counters("acme", "20240605")).total.reserved > 0
    assert (await ledger.counters("acme", "20240606")).total.reserved == 0


async def test_sweep_charges_expired_reservations_and_says_so(ledger: RedisLedger) -> None:
    clock = Clock()
    engine, events = _engine(ledger, clock=clock)
    decision = await engine.authorize(make_attempt(number=LONDON, call_id="lost"))
    clock.now += decision.max_seconds + 31
    swept = await engine.sweep()
    assert [s.call_id for s in swept] == ["lost"]
    assert swept[0].charged == decision.reserved
    assert [e.kind for e in events] == [EventKind.SWEPT]


async def test_preview_reserves_nothing(ledger: RedisLedger) -> None:
    engine, events = _engine(ledger)
    preview = await engine.preview(make_attempt(number=UK_MOBILE, call_id="p1"))
    assert (preview.decision.result, preview.decision.max_seconds) == (Result.ALLOW, 3000)
    assert await ledger.live_calls("acme") == []
    assert events == []


async def test_preview_reports_a_spent_budget(ledger: RedisLedger) -> None:
    engine, _ = _engine(ledger)
    await engine.authorize(make_attempt(number=UK_MOBILE, call_id="x1"))
    preview = await engine.preview(make_attempt(number=UK_MOBILE, call_id="x2"))
    assert preview.decision.reason is Reason.DAILY_LIMIT_EXTENSION


# ---- the store is down ---------------------------------------------------------------------


@pytest.fixture
async def dead_ledger(key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url("redis://127.0.0.1:1/0", prefix=key_prefix, timeout=0.05)
    yield store
    await store.close()


async def test_store_down_denies_by_default(dead_ledger: RedisLedger) -> None:
    engine, events = _engine(dead_ledger)
    decision = await engine.authorize(make_attempt(number=LONDON))
    assert (decision.result, decision.reason) == (Result.DENY, Reason.STORE_UNAVAILABLE)
    assert [e.kind for e in events] == [EventKind.STORE_UNAVAILABLE]


async def test_store_down_allow_local_lets_only_local_classes_through(
    dead_ledger: RedisLedger,
) -> None:
    snapshot = make_snapshot(
        tenants=[make_tenant(fail_mode=FailMode.ALLOW_LOCAL)],
        extensions=[make_extension("1002")],
    )
    engine, events = _engine(dead_ledger, snapshot)
    local = await engine.authorize(make_attempt(extension="1002", number=LONDON))
    assert (local.result, local.reason, local.max_seconds) == (
        Result.ALLOW,
        Reason.STORE_UNAVAILABLE,
        120,
    )
    abroad = await engine.authorize(make_attempt(extension="1002", number=PARIS))
    assert (abroad.result, abroad.reason) == (Result.DENY, Reason.STORE_UNAVAILABLE)
    assert [e.kind for e in events] == [EventKind.FAIL_OPEN, EventKind.STORE_UNAVAILABLE]


async def test_emergency_calls_pass_with_the_store_down(dead_ledger: RedisLedger) -> None:
    engine, _ = _engine(dead_ledger)
    decision = await engine.authorize(make_attempt(number="112", user_agent="sipvicious"))
    assert (decision.result, decision.reason, decision.max_seconds) == (
        Result.ALLOW,
        Reason.EMERGENCY,
        7200,
    )


class _TimesOutAfterRunning:
    """A ledger whose reserve ran on the server but whose answer was lost."""

    def __init__(self, inner: RedisLedger) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def reserve(self, req: Any) -> Any:
        await self.inner.reserve(req)
        raise StorageError("timed out after sending")


async def test_a_reservation_whose_answer_was_lost_is_released(ledger: RedisLedger) -> None:
    engine, _ = _engine(_TimesOutAfterRunning(ledger))
    decision = await engine.authorize(make_attempt(number=LONDON, call_id="ghost"))
    assert decision.reason is Reason.STORE_UNAVAILABLE
    await engine.drain()
    assert await ledger.live_calls("acme") == []
    counters = await ledger.counters("acme", "20240605")
    assert (counters.total.spent, counters.total.reserved) == (0, 0)


async def test_a_reload_swaps_the_snapshot_and_a_failed_one_keeps_it() -> None:
    holder = SnapshotHolder(make_snapshot(version=1))

    async def version() -> int:
        return 2

    def broken() -> Snapshot:
        raise RuntimeError("database is down")

    assert not await holder.reload_if_changed(broken, version)
    assert holder.current.version == 1 and "database is down" in holder.last_error
    assert await holder.reload_if_changed(lambda: replace(make_snapshot(), version=2), version)
    assert holder.current.version == 2 and holder.last_error == ""
