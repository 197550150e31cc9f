"""The ``memory://`` store: the same ledger in process (fakeredis with Lua), loudly flagged."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from ledger_support import DAY, NOW, RATE, request

from guard.domain import Reason, UaLockMode
from guard.ledger import RedisLedger, ledger_from_url
from guard.ledger.storage import MEMORY_WARNING, shadow_ledger_for, warn_memory_store
from guard.ledger.types import SettleOutcome
from guard.money import call_cost, max_affordable_seconds
from guard.settings import load_settings


@pytest.fixture
async def memory() -> AsyncIterator[RedisLedger]:
    async with ledger_from_url("memory://", prefix=f"mem-{uuid.uuid4().hex[:12]}") as ledger:
        yield ledger


def test_memory_store_warns_that_it_is_neither_shared_nor_durable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warn_memory_store.cache_clear()  # another test of this process may have built one already
    with caplog.at_level(logging.WARNING, logger="guard.ledger"):
        ledger_from_url("memory://")

    assert [r.getMessage() for r in caplog.records] == [MEMORY_WARNING]
    assert "NOT shared between processes" in MEMORY_WARNING
    assert "NOT durable" in MEMORY_WARNING


def test_memory_store_warns_once_per_process_however_many_ledgers_it_builds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warn_memory_store.cache_clear()
    settings = load_settings({}, redis_url="memory://", redis_prefix="mem-once")
    with caplog.at_level(logging.WARNING, logger="guard.ledger"):
        ledger_from_url("memory://", prefix="mem-live")
        shadow_ledger_for(settings)  # the shadow counters, as ``guard serve`` builds them
        ledger_from_url("memory://", prefix="mem-other")

    assert [r.getMessage() for r in caplog.records] == [MEMORY_WARNING]


async def test_memory_store_runs_the_whole_call_lifecycle(memory: RedisLedger) -> None:
    budget = 50_000
    learn = {"ua_mode": UaLockMode.LEARN, "user_agent": "Yealink"}
    reservation = await memory.reserve(request(ext_daily_limit=budget, **learn))
    retry = await memory.reserve(request(ext_daily_limit=budget, **learn))
    mismatch = await memory.reserve(
        request(call_id="x", user_agent="sipvicious", ua_mode=UaLockMode.LEARN)
    )
    settled = await memory.settle("acme", "call-1", 75, NOW + 80)
    repeat = await memory.settle("acme", "call-1", 75, NOW + 81)
    orphan = await memory.settle("acme", "ghost", 5, NOW + 82)
    counters = await memory.counters("acme", DAY)

    seconds = max_affordable_seconds(RATE, budget, 3_600)
    assert (reservation.max_seconds, reservation.reserved) == (seconds, call_cost(RATE, seconds))
    assert retry.existing
    assert (mismatch.reason, mismatch.locked_now) == (Reason.USER_AGENT_MISMATCH, True)
    assert (settled.outcome, settled.cost) == (SettleOutcome.SETTLED, call_cost(RATE, 75))
    assert repeat.outcome is SettleOutcome.ALREADY_SETTLED
    assert orphan.outcome is SettleOutcome.UNKNOWN_CALL
    assert (counters.total.spent, counters.total.reserved) == (call_cost(RATE, 75), 0)
    assert (await memory.extension_state("acme", "100")).locked
    assert await memory.unlock_extension("acme", "100")


async def test_memory_store_sweeps_and_reconciles(memory: RedisLedger) -> None:
    reservation = await memory.reserve(request(max_call_seconds=60, grace_seconds=0))
    swept = await memory.sweep("acme", NOW + 61)
    late = await memory.settle("acme", "call-1", 40, NOW + 90)

    assert [(s.call_id, s.charged) for s in swept] == [("call-1", reservation.reserved)]
    assert late.outcome is SettleOutcome.SETTLED_AFTER_SWEEP
    counters = await memory.counters("acme", DAY)
    assert counters.total.spent == call_cost(RATE, 40)


async def test_memory_store_holds_limits_under_concurrency(memory: RedisLedger) -> None:
    minimal = call_cost(RATE, RATE.initial_increment)
    answers = await asyncio.gather(
        *(
            memory.reserve(
                request(
                    call_id=f"c{i}",
                    ext_daily_limit=7 * minimal,
                    max_call_seconds=RATE.initial_increment,
                )
            )
            for i in range(50)
        )
    )

    assert Counter(a.reason for a in answers) == {
        Reason.ALLOWED: 7,
        Reason.DAILY_LIMIT_EXTENSION: 43,
    }


async def test_memory_ledgers_of_one_process_share_their_counters(memory: RedisLedger) -> None:
    await memory.reserve(request())
    async with ledger_from_url("memory://", prefix=memory.prefix) as other:
        counters = await other.counters("acme", DAY)
        await other.bump_config_version(at_least=4)

    assert counters.total.live_calls == 1
    assert await memory.config_version() == 4


async def test_memory_store_handles_hostile_names_and_refusals(memory: RedisLedger) -> None:
    extension = 'a}{b:"\\\x00ü\udcff'
    reservation = await memory.reserve(request(extension=extension))
    settled = await memory.settle("acme", "call-1", 10, NOW + 20)
    refusals = await memory.record_refusal("acme", extension, "::1", Reason.BAD_REQUEST, NOW)

    assert reservation.allowed
    assert settled.extension == 'a}{b:"\\\x00ü?'
    assert (refusals.ip, refusals.extension) == (1, 1)
    assert await memory.ping() >= 0
