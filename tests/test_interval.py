"""Interval reservations on the real Redis: a call reserves one slice at a time, the extender
grows it before it runs out (atomically, once per slice however many extenders run) and cuts the
call over ARI (the stand-in) when the budget cannot pay the next slice; parallel calls share a
budget without overshooting it; settle and sweep charge a reservation that grew. The extender
runs on a fake clock and a fake sleep, so every cut is timed exactly; one test measures the
real lateness of a cut (timer plus ARI round trip) against the stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cli_support import GuardCli
from factories import make_attempt, make_extension, make_snapshot, make_tenant
from ledger_support import DAY, NOW, RATE, request

from guard.agi import contract
from guard.agi.routes import decision_commands
from guard.ari.app import decision_variables
from guard.ari.client import AriAuthError, AriClient
from guard.ari.testing import AriStandIn, dialplan_stasis_data
from guard.config import db, repository
from guard.config.loader import build_snapshot
from guard.domain import DestinationClass, Rate, Reason, ReservationMode
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import ConfigurationError
from guard.events import Event, EventBus, EventKind
from guard.interval import ExtenderSettings, SliceExtender
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.ledger.types import (
    ReserveRequest,
    SettleOutcome,
    SliceCall,
    SliceExtension,
    SliceOutcome,
)
from guard.money import call_cost
from guard.service import serve
from guard.settings import load_settings
from guard.snapshot import Snapshot

PASSWORD = "s3cret-Pa55"
#: 0.60 a minute billed per second: every second has a price, so a budget buys an exact time.
PER_SECOND = replace(RATE, connect_fee=0, initial_increment=1, subsequent_increment=1)
UK = Rate("44", "United Kingdom", DestinationClass.NATIONAL, 200, 0, 1, 1)


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


@pytest.fixture
async def ari() -> AsyncIterator[AriStandIn]:
    async with AriStandIn(username="guard", password=PASSWORD) as standin:
        yield standin


def interval(**changes: Any) -> ReserveRequest:
    """A reservation request in interval mode: 60 s slices, per-second billing."""
    return request(**{"rate": PER_SECOND, "slice_seconds": 60, **changes})


async def alive(ledger: RedisLedger, tenant: str = "acme") -> None:
    """Tell the ledger an extender serves ``tenant`` (as the extender's pass does)."""
    await ledger.due_slices(tenant, 0, alive_seconds=60)


async def the_slice(ledger: RedisLedger, call_id: str, tenant: str = "acme") -> SliceCall:
    (call,) = [c for c in await ledger.due_slices(tenant, 2**40) if c.call_id == call_id]
    return call


# --- the ledger ---------------------------------------------------------------------------------


async def test_interval_reservation_holds_one_slice_and_knows_its_cap(
    ledger: RedisLedger,
) -> None:
    await alive(ledger)
    granted = await ledger.reserve(interval(tenant_daily_limit=call_cost(PER_SECOND, 1000)))
    assert (granted.max_seconds, granted.cap_seconds) == (60, 1000)
    assert granted.reserved == call_cost(PER_SECOND, 60)
    counters = await ledger.counters("acme", DAY)
    assert counters.total.reserved == granted.reserved
    call = await the_slice(ledger, "call-1")
    assert (call.started, call.ends_ms, call.slice_seconds, call.final) == (
        NOW,
        int(NOW * 1000) + 60_000,
        60,
        "",
    )
    (live,) = await ledger.live_calls("acme")
    assert (live.slice_seconds, live.cap_seconds, live.max_seconds) == (60, 1000, 60)


async def test_without_an_extender_the_whole_call_is_reserved(ledger: RedisLedger) -> None:
    granted = await ledger.reserve(interval())
    assert (granted.max_seconds, granted.cap_seconds) == (3600, 0)
    assert await ledger.due_slices("acme", 2**40) == []


async def test_a_budget_smaller_than_a_slice_reserves_the_whole_call(ledger: RedisLedger) -> None:
    await alive(ledger)
    granted = await ledger.reserve(interval(tenant_daily_limit=call_cost(PER_SECOND, 40)))
    assert (granted.max_seconds, granted.cap_seconds) == (40, 0)


async def test_extension_adds_a_slice_and_moves_every_deadline(ledger: RedisLedger) -> None:
    await alive(ledger)
    await ledger.reserve(interval())
    call = await the_slice(ledger, "call-1")
    grown = await ledger.extend_slice(call, NOW + 50, ext_daily_limit=None, tenant_daily_limit=None)
    assert grown.outcome == SliceOutcome.EXTENDED
    assert (grown.max_seconds, grown.reserved) == (120, call_cost(PER_SECOND, 120))
    assert grown.ends_ms == call.ends_ms + 60_000
    assert (await ledger.counters("acme", DAY)).total.reserved == grown.reserved
    (live,) = await ledger.live_calls("acme")
    assert live.deadline == NOW + 120 + 60  # max seconds + grace: the sweeper waits longer
    # An extension is asked with the slice end it saw: a late or repeated one is stale.
    stale = await ledger.extend_slice(call, NOW + 51, ext_daily_limit=None, tenant_daily_limit=None)
    assert (stale.outcome, stale.max_seconds) == (SliceOutcome.STALE, 120)
    assert not stale.refused


async def test_two_extenders_at_once_extend_once(ledger: RedisLedger) -> None:
    await alive(ledger)
    await ledger.reserve(interval())
    call = await the_slice(ledger, "call-1")
    answers = await asyncio.gather(
        *(
            ledger.extend_slice(call, NOW + 50, ext_daily_limit=None, tenant_daily_limit=None)
            for _ in range(8)
        )
    )
    assert sorted(a.outcome for a in answers) == ["extended"] + ["stale"] * 7
    assert (await ledger.counters("acme", DAY)).total.reserved == call_cost(PER_SECOND, 120)


async def test_the_budget_bounds_an_extension_then_refuses_it_for_good(
    ledger: RedisLedger,
) -> None:
    await alive(ledger)
    limit = call_cost(PER_SECOND, 200)
    await ledger.reserve(interval(tenant_daily_limit=limit))
    await ledger.reserve(interval(call_id="other", tenant_daily_limit=limit))  # holds 60 s

    async def extend(when: int) -> SliceExtension:
        call = await the_slice(ledger, "call-1")
        return await ledger.extend_slice(
            call, NOW + when, ext_daily_limit=None, tenant_daily_limit=limit
        )

    assert (await extend(50)).max_seconds == 120
    partial = await extend(110)  # 20 s of budget left besides its own 120 s
    assert (partial.outcome, partial.max_seconds) == ("extended", 140)
    assert (await ledger.counters("acme", DAY)).total.reserved == limit
    refused = await extend(130)
    assert (refused.outcome, refused.max_seconds) == (Reason.DAILY_LIMIT_TENANT, 140)
    assert refused.refused
    assert (await the_slice(ledger, "call-1")).final == Reason.DAILY_LIMIT_TENANT
    # Final: even a raised limit does not extend it any more.
    call = await the_slice(ledger, "call-1")
    again = await ledger.extend_slice(
        call, NOW + 131, ext_daily_limit=None, tenant_daily_limit=None
    )
    assert again.outcome == Reason.DAILY_LIMIT_TENANT


@pytest.mark.parametrize(
    ("changes", "ext_limit", "locked", "when", "outcome"),
    [
        ({}, call_cost(PER_SECOND, 60), False, 50, Reason.DAILY_LIMIT_EXTENSION),
        ({}, call_cost(PER_SECOND, 90), False, 50, "extended"),
        ({}, None, True, 50, Reason.EXTENSION_LOCKED),
        ({}, None, False, 60, SliceOutcome.EXPIRED),
        ({"max_call_seconds": 60 * 2}, None, False, 50, "extended"),
    ],
)
async def test_extension_outcomes(
    ledger: RedisLedger,
    changes: dict[str, Any],
    ext_limit: int | None,
    locked: bool,
    when: int,
    outcome: str,
) -> None:
    await alive(ledger)
    await ledger.reserve(interval(**changes))
    if locked:
        await ledger.lock_extension("acme", "100", "manual", now=NOW)
    answer = await ledger.extend_slice(
        await the_slice(ledger, "call-1"),
        NOW + when,
        ext_daily_limit=ext_limit,
        tenant_daily_limit=None,
    )
    assert answer.outcome == outcome


async def test_the_cap_ends_the_extensions(ledger: RedisLedger) -> None:
    await alive(ledger)
    await ledger.reserve(interval(max_call_seconds=90))
    first = await ledger.extend_slice(
        await the_slice(ledger, "call-1"), NOW + 50, ext_daily_limit=None, tenant_daily_limit=None
    )
    assert (first.outcome, first.max_seconds) == ("extended", 90)
    last = await ledger.extend_slice(
        await the_slice(ledger, "call-1"), NOW + 85, ext_daily_limit=None, tenant_daily_limit=None
    )
    assert last.outcome == SliceOutcome.CAP_REACHED


async def test_a_configuration_refusal_is_final(ledger: RedisLedger) -> None:
    await alive(ledger)
    await ledger.reserve(interval())
    call = await the_slice(ledger, "call-1")
    answer = await ledger.extend_slice(
        call, NOW + 50, ext_daily_limit=None, tenant_daily_limit=None, deny="unknown_extension"
    )
    assert answer.outcome == "unknown_extension" and answer.refused
    assert (await the_slice(ledger, "call-1")).final == "unknown_extension"


async def test_one_cut_claim_wins_and_a_failed_cut_can_be_given_back(
    ledger: RedisLedger,
) -> None:
    await alive(ledger)
    await ledger.reserve(interval())
    call = await the_slice(ledger, "call-1")
    claims = await asyncio.gather(
        *(ledger.claim_cut("acme", "call-1", call.ends_ms) for _ in range(5))
    )
    assert sorted(claims) == [False] * 4 + [True]
    assert await ledger.due_slices("acme", 2**40) == []
    # Claimed: the slice can no longer be extended.
    late = await ledger.extend_slice(call, NOW + 1, ext_daily_limit=None, tenant_daily_limit=None)
    assert late.refused
    await ledger.restore_cut("acme", "call-1", call.ends_ms)
    assert (await the_slice(ledger, "call-1")).final == SliceOutcome.EXPIRED
    # A claim naming another end (the slice was extended meanwhile) wins nothing.
    assert not await ledger.claim_cut("acme", "call-1", call.ends_ms + 1)


async def test_settle_charges_the_real_cost_of_a_grown_reservation(ledger: RedisLedger) -> None:
    await alive(ledger)
    await ledger.reserve(interval())
    for when in (50, 110, 170):
        await ledger.extend_slice(
            await the_slice(ledger, "call-1"),
            NOW + when,
            ext_daily_limit=None,
            tenant_daily_limit=None,
        )
    assert (await ledger.counters("acme", DAY)).total.reserved == call_cost(PER_SECOND, 240)
    settled = await ledger.settle("acme", "call-1", 200, NOW + 201)
    assert settled.outcome is SettleOutcome.SETTLED
    assert (settled.cost, settled.reserved) == (
        call_cost(PER_SECOND, 200),
        call_cost(PER_SECOND, 240),
    )
    assert not settled.over_reservation
    counters = await ledger.counters("acme", DAY)
    assert (counters.total.spent, counters.total.reserved) == (call_cost(PER_SECOND, 200), 0)
    assert await ledger.due_slices("acme", 2**40) == []


async def test_sweep_charges_the_grown_reservation_in_full(ledger: RedisLedger) -> None:
    await alive(ledger)
    await ledger.reserve(interval(grace_seconds=0))
    await ledger.extend_slice(
        await the_slice(ledger, "call-1"), NOW + 50, ext_daily_limit=None, tenant_daily_limit=None
    )
    assert await ledger.sweep("acme", NOW + 119) == []  # the deadline moved with the slice
    (swept,) = await ledger.sweep("acme", NOW + 121)
    assert swept.charged == call_cost(PER_SECOND, 120)
    assert await ledger.due_slices("acme", 2**40) == []


async def test_parallel_extensions_never_overshoot_the_shared_budget(
    ledger: RedisLedger,
) -> None:
    await alive(ledger)
    limit = call_cost(PER_SECOND, 1000)
    calls = [f"p{i}" for i in range(6)]
    for call_id in calls:
        granted = await ledger.reserve(interval(call_id=call_id, tenant_daily_limit=limit))
        assert granted.max_seconds == 60
    now = NOW
    while due := [c for c in await ledger.due_slices("acme", 2**40) if not c.final]:
        now += 50
        await asyncio.gather(
            *(
                ledger.extend_slice(c, now, ext_daily_limit=None, tenant_daily_limit=limit)
                for c in due
            )
        )
        reserved = (await ledger.counters("acme", DAY)).total.reserved
        assert reserved <= limit
    seconds = sorted(call.max_seconds for call in await ledger.live_calls("acme"))
    assert sum(seconds) == 1000  # the budget is used to the second, never beyond
    assert seconds[-1] - seconds[0] <= 60  # and fairly: no call is more than a slice ahead


# --- the extender ---------------------------------------------------------------------------


@dataclass
class FakeTime:
    """A clock and a sleep that only moves it: cuts are timed exactly, at no real cost."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def interval_snapshot(**tenant: Any) -> Snapshot:
    fields: dict[str, Any] = {
        "reservation_mode": ReservationMode.INTERVAL,
        "slice_seconds": 60,
        "daily_limit": call_cost(PER_SECOND, 150),
    }
    fields.update(tenant)
    return make_snapshot(
        tenants=[make_tenant(**fields)],
        extensions=[make_extension("100", daily_limit=None, concurrent_limit=None)],
    )


def extender(
    ledger: RedisLedger,
    client: AriClient,
    snapshot: Snapshot,
    fake: FakeTime,
    bus: EventBus | None = None,
    **settings: Any,
) -> SliceExtender:
    options = {"lead": 10.0, "tick": 1.0, "cut_margin": 0.5, **settings}
    return SliceExtender(
        ledger,
        SnapshotHolder(snapshot),
        client,
        bus or EventBus(),
        ExtenderSettings(**options),
        clock=fake,
        sleep=fake.sleep,
    )


@contextlib.asynccontextmanager
async def ari_client(ari: AriStandIn) -> AsyncIterator[AriClient]:
    async with AriClient(ari.base_url, "guard", PASSWORD) as client:
        yield client


def deletes(ari: AriStandIn) -> list[str]:
    return [c.path.rsplit("/", 1)[-1] for c in ari.calls if c.method == "DELETE"]


async def test_interval_call_is_extended_then_cut_when_its_budget_ends(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    fake = FakeTime()
    bus = EventBus()
    cuts: list[Event] = []
    bus.add_sink(cuts.append)
    snapshot = interval_snapshot()
    limit = snapshot.tenants["acme"].daily_limit
    channel = ari.add_channel(channel_id="call-1")  # a FastAGI call: never in Stasis
    async with ari_client(ari) as client:
        worker = extender(ledger, client, snapshot, fake, bus)
        await worker.tick()  # marks the tenant served: the next call reserves a slice
        granted = await ledger.reserve(
            interval(tenant_daily_limit=limit, channel=channel.name, now=fake.now)
        )
        assert (granted.max_seconds, granted.cap_seconds) == (60, 150)
        maxima = []
        for second in (45, 51, 111, 141):
            fake.now = NOW + second
            await worker.tick()
            await worker.drain()
            maxima.append((await ledger.live_calls("acme"))[0].max_seconds)
        # Not yet due at 45 s (lead 10 s); one slice more at 51 s; what is left (30 s) at 111 s;
        # refused at 141 s (the cap: all the budget buys): cut 0.5 s before the money runs out
        # at 150 s, not a moment later.
        assert maxima == [60, 120, 150, 150]
        assert deletes(ari) == ["call-1"]
        assert fake.now == NOW + 149.5
        (cut,) = cuts
        assert (cut.kind, cut.reason, cut.call_id) == (
            EventKind.CALL_CUT,
            SliceOutcome.CAP_REACHED,
            "call-1",
        )
        assert cut.detail["late_ms"] == 0
        assert worker.cuts == 1
    settled = await ledger.settle("acme", "call-1", 149, fake.now)
    assert not settled.over_reservation
    counters = await ledger.counters("acme", DAY)
    assert counters.total.spent <= limit and counters.total.reserved == 0


async def test_a_call_that_is_already_gone_is_not_counted_as_cut(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    fake = FakeTime()
    snapshot = interval_snapshot(daily_limit=call_cost(PER_SECOND, 60))
    async with ari_client(ari) as client:
        worker = extender(ledger, client, snapshot, fake)
        await worker.tick()
        await ledger.reserve(interval(tenant_daily_limit=call_cost(PER_SECOND, 70)))
        fake.now = NOW + 55
        await worker.tick()
        await worker.drain()
    assert worker.cuts == 0
    assert [c.status for c in ari.calls if c.method == "DELETE"] == [404]


async def test_parallel_interval_calls_share_the_budget_without_overshoot(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    fake = FakeTime()
    limit = call_cost(PER_SECOND, 500)
    snapshot = interval_snapshot(daily_limit=limit)
    call_ids = [f"par-{i}" for i in range(4)]
    for call_id in call_ids:
        ari.add_channel(channel_id=call_id)
    async with ari_client(ari) as client:
        worker = extender(ledger, client, snapshot, fake)
        await worker.tick()
        for call_id in call_ids:
            await ledger.reserve(interval(call_id=call_id, tenant_daily_limit=limit))
        while len(deletes(ari)) < len(call_ids):
            fake.now += 1
            await worker.tick()
            await worker.drain()
            assert (await ledger.counters("acme", DAY)).total.reserved <= limit
            assert fake.now < NOW + 600
    live = await ledger.live_calls("acme")
    assert sum(call.max_seconds for call in live) == 500
    # Each call was cut when its own money ran out, and all of it was used.
    for call in live:
        settled = await ledger.settle("acme", call.call_id, call.max_seconds, fake.now)
        assert not settled.over_reservation
    assert (await ledger.counters("acme", DAY)).total.spent == limit


async def test_two_extenders_extend_each_slice_once_and_cut_once(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    fake = FakeTime()
    snapshot = interval_snapshot(daily_limit=call_cost(PER_SECOND, 100))
    ari.add_channel(channel_id="call-1")
    async with ari_client(ari) as first_client, ari_client(ari) as second_client:
        first = extender(ledger, first_client, snapshot, fake)
        second = extender(ledger, second_client, snapshot, fake)
        await first.tick()
        await ledger.reserve(interval(tenant_daily_limit=call_cost(PER_SECOND, 100)))
        fake.now = NOW + 55
        await asyncio.gather(first.tick(), second.tick())
        assert (await ledger.live_calls("acme"))[0].max_seconds == 100
        fake.now = NOW + 95
        await asyncio.gather(first.tick(), second.tick())
        await asyncio.gather(first.drain(), second.drain())
    assert deletes(ari) == ["call-1"]
    assert first.cuts + second.cuts == 1
    assert (await ledger.counters("acme", DAY)).total.reserved == call_cost(PER_SECOND, 100)


async def test_a_locked_or_removed_extension_is_not_extended(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    fake = FakeTime()
    snapshot = replace(interval_snapshot(), extensions={})
    ari.add_channel(channel_id="call-1")
    async with ari_client(ari) as client:
        worker = extender(ledger, client, snapshot, fake)
        await worker.tick()
        await ledger.reserve(interval())
        fake.now = NOW + 55
        await worker.tick()
        await worker.drain()
    assert deletes(ari) == ["call-1"] and fake.now == NOW + 59.5


async def test_calls_outlive_their_tenant_leaving_interval_mode(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    fake = FakeTime()
    snapshot = interval_snapshot()
    async with ari_client(ari) as client:
        worker = extender(ledger, client, snapshot, fake)
        await worker.tick()
        await ledger.reserve(interval())
        await worker.tick()  # the call is not due yet
        tenant = replace(snapshot.tenants["acme"], reservation_mode=ReservationMode.CALL)
        worker.snapshots.current = replace(snapshot, tenants={"acme": tenant})
        fake.now = NOW + 51
        await worker.tick()
        assert (await ledger.live_calls("acme"))[0].max_seconds == 120
        await ledger.settle("acme", "call-1", 100, fake.now)
        await worker.tick()  # settled: nothing left to serve
        assert await ledger.due_slices("acme", 2**40) == []


async def test_without_redis_known_slices_are_cut_when_they_end(
    ledger: RedisLedger, ari: AriStandIn, redis_url: str, key_prefix: str
) -> None:
    fake = FakeTime()
    snapshot = interval_snapshot()
    ari.add_channel(channel_id="call-1")
    async with ari_client(ari) as client:
        worker = extender(ledger, client, snapshot, fake)
        await worker.tick()
        await ledger.reserve(interval())
        fake.now = NOW + 51
        await worker.tick()  # extends the call to 120 s, and remembers it
        fake.now = NOW + 60
        broken = ledger_from_url("redis://127.0.0.1:1", prefix=key_prefix, timeout=0.05)
        worker.ledger = broken
        await worker.tick()
        await worker.drain()
        await broken.close()
    assert deletes(ari) == ["call-1"]
    assert fake.now == NOW + 119.5  # fail closed, at the end of the money already reserved


# --- the engine and the adapters ------------------------------------------------------------


def test_settings_of_ari_and_interval_mode() -> None:
    settings = load_settings(
        {
            "GUARD_ARI_URL": "http://127.0.0.1:8088/ari/",
            "GUARD_ARI_PASSWORD": PASSWORD,
            "GUARD_INTERVAL_LEAD_SECONDS": "20",
        }
    )
    assert settings.ari_enabled and settings.ari_url == "http://127.0.0.1:8088/ari"
    assert (settings.ari_user, settings.ari_app, settings.ari_refuse) == (
        "guard",
        "guard",
        "hangup",
    )
    assert settings.interval_lead_seconds == 20 and settings.interval_cut_margin_ms == 500
    assert settings.public()["ari_password"] == "***"
    assert not load_settings({}).ari_enabled
    for bad in ("ftp://host/ari", "http://guard:pw@host/ari", "host:8088"):
        with pytest.raises(ConfigurationError, match="GUARD_ARI_URL"):
            load_settings({"GUARD_ARI_URL": bad})


async def test_engine_grants_an_interval_call_its_first_slice_and_the_adapters_say_so(
    ledger: RedisLedger,
) -> None:
    snapshot = make_snapshot(reservation_mode=ReservationMode.INTERVAL, slice_seconds=120)
    engine = Engine(
        SnapshotHolder(snapshot), ledger, EventBus(), EngineSettings(), clock=lambda: NOW
    )
    whole = await engine.authorize(make_attempt(call_id="w1"))
    assert (whole.max_seconds, whole.cap_seconds) == (3600, 0)  # no extender: whole call
    assert contract.MODE not in decision_variables("acme", whole)
    await alive(ledger)
    decision = await engine.authorize(make_attempt(call_id="i1"))
    assert (decision.max_seconds, decision.cap_seconds) == (120, 3600)
    variables = decision_variables("acme", decision)
    assert variables[contract.MODE] == "interval"
    assert variables[contract.CAP_SECONDS] == "3600"
    assert variables[contract.MAX_SECONDS] == "120"
    commands = decision_commands("acme", decision)
    assert commands[-1].startswith(f"SET VARIABLE {contract.RESULT} ")
    assert f'SET VARIABLE {contract.CAP_SECONDS} "3600"' in commands


def test_tenant_set_chooses_interval_reservations(sqlite_url: str, key_prefix: str) -> None:
    guard = GuardCli(sqlite_url, key_prefix)
    guard.run("db", "upgrade")
    added = guard.json("tenant", "add", "acme")
    assert (added["reservation_mode"], added["slice_seconds"]) == ("call", 300)
    changed = guard.json(
        "tenant", "set", "acme", "--reservation-mode", "interval", "--slice", "120"
    )
    assert (changed["reservation_mode"], changed["slice_seconds"]) == ("interval", 120)
    assert "interval, 120 s at a time" in guard.run("tenant", "show", "acme").output
    refused = guard.run("tenant", "set", "acme", "--slice", "5", code=2)
    assert "slice_seconds" in refused.output
    engine = db.make_engine(sqlite_url)
    try:
        tenant = build_snapshot(engine).tenants["acme"]
    finally:
        engine.dispose()
    assert (tenant.reservation_mode, tenant.slice_seconds) == (ReservationMode.INTERVAL, 120)


# --- guard ari / guard serve --ari ----------------------------------------------------------


def _configure(url: str) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    repository.add_tenant(engine, "acme", actor="test", country_code="44")
    repository.add_extension(engine, "acme", "1001", actor="test")
    repository.import_rates(engine, [UK], actor="test")
    engine.dispose()


async def test_guard_ari_starts_serves_and_stops_cleanly(
    ari: AriStandIn, sqlite_url: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(_configure, sqlite_url)
    settings = load_settings(
        {
            "GUARD_DATABASE_URL": sqlite_url,
            "GUARD_REDIS_URL": redis_url,
            "GUARD_REDIS_PREFIX": key_prefix,
            "GUARD_ARI_URL": ari.base_url,
            "GUARD_ARI_PASSWORD": PASSWORD,
            "GUARD_METRICS_LISTEN": "",
            "GUARD_INTERVAL_TICK_SECONDS": "0.05",
        }
    )
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(settings, agi=False, ari=True, started=started, until=stop.wait())
    )
    await asyncio.wait_for(started.wait(), 10)
    await ari.wait_connected()
    channel = ari.stasis(
        dialplan_stasis_data(
            tenant="acme", ext="1001", number="00441234567", source_ip="127.0.0.1", user_agent="x"
        )
    )
    await ari.wait_for(lambda: any(c.path.endswith("/continue") for c in ari.calls_to(channel.id)))
    assert channel.variables["GUARD_RESULT"] == "ALLOW"
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_guard_ari_stops_on_refused_credentials(
    ari: AriStandIn, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    await asyncio.to_thread(_configure, sqlite_url)
    settings = load_settings(
        {
            "GUARD_DATABASE_URL": sqlite_url,
            "GUARD_REDIS_URL": redis_url,
            "GUARD_REDIS_PREFIX": key_prefix,
            "GUARD_ARI_URL": ari.base_url,
            "GUARD_ARI_PASSWORD": "wrong",
            "GUARD_METRICS_LISTEN": "",
        }
    )
    with pytest.raises(AriAuthError):
        await asyncio.wait_for(
            serve(settings, agi=False, ari=True, until=asyncio.Event().wait()), 10
        )


async def test_guard_ari_needs_ari_settings(sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match="GUARD_ARI_URL"):
        await serve(load_settings({"GUARD_DATABASE_URL": sqlite_url}), agi=False, ari=True)


# --- precision ------------------------------------------------------------------------------


async def test_measured_lateness_of_a_cut_against_the_stand_in(
    ledger: RedisLedger, ari: AriStandIn
) -> None:
    """Real clock, real timers, real Redis and HTTP: how long after its target a cut's
    ``DELETE`` has been answered (the ledger's claim, then the ARI round trip)."""
    rounds = 30
    bus = EventBus()
    cuts: list[Event] = []
    bus.add_sink(cuts.append)
    # One second slices; the configuration's limit pays for no extension: every call is cut.
    snapshot = interval_snapshot(slice_seconds=1, daily_limit=call_cost(PER_SECOND, 1))
    settings = ExtenderSettings(lead=0.5, tick=0.05, cut_margin=0.0)
    async with ari_client(ari) as client:
        worker = SliceExtender(ledger, SnapshotHolder(snapshot), client, bus, settings)
        running = asyncio.create_task(worker.run())
        try:
            await alive(ledger)
            for i in range(rounds):
                ari.add_channel(channel_id=f"m{i}")
                granted = await ledger.reserve(
                    interval(call_id=f"m{i}", now=time.time(), slice_seconds=1, max_call_seconds=5)
                )
                assert granted.cap_seconds == 5
                await asyncio.sleep(0.037)  # slice ends spread over the ticks
            await ari.wait_for(lambda: len(cuts) == rounds)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    late = sorted(float(str(event.detail["late_ms"])) for event in cuts)
    print(
        f"\ncut lateness over {rounds} cuts (ms): min {late[0]}, median "
        f"{statistics.median(late)}, p95 {late[int(rounds * 0.95) - 1]}, max {late[-1]}"
    )
    # The bound is the design's, not the VM's: a cut is due within a tick (50 ms) plus one
    # Redis and one HTTP round trip, so the median must sit well inside a tick. A shared CI
    # host stalls now and then for ~100 ms, so a single cut may be late by that much; a cut
    # that slipped to a later slice (a scheduling bug) would be >= 1000 ms late.
    assert all(0 <= ms < 500 for ms in late)
    assert statistics.median(late) < 50
