"""Limits hold and money is counted once when many calls, guards and processes race on one Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from collections.abc import AsyncIterator
from multiprocessing.synchronize import Event

import pytest
from ledger_support import DAY, NOW, RATE, request

from guard.domain import Reason
from guard.ledger import RedisLedger, ledger_from_url
from guard.ledger.types import SettleOutcome
from guard.money import call_cost

#: Every reservation below lasts at most the first increment: one minimal call each.
MINIMAL = call_cost(RATE, RATE.initial_increment)
SHORT = {"max_call_seconds": RATE.initial_increment}


@pytest.fixture
async def ledgers(redis_url: str, key_prefix: str) -> AsyncIterator[list[RedisLedger]]:
    """Four ledgers (four connection pools), as four guards would have."""
    opened = [ledger_from_url(redis_url, prefix=key_prefix, timeout=5.0) for _ in range(4)]
    yield opened
    for ledger in opened:
        await ledger.close()


async def test_parallel_calls_never_exceed_the_extension_daily_limit(
    ledgers: list[RedisLedger],
) -> None:
    allowed_calls = 17
    answers = await asyncio.gather(
        *(
            ledgers[i % 4].reserve(
                request(call_id=f"c{i}", ext_daily_limit=allowed_calls * MINIMAL, **SHORT)
            )
            for i in range(200)
        )
    )

    reasons = Counter(answer.reason for answer in answers)
    assert reasons == {Reason.ALLOWED: allowed_calls, Reason.DAILY_LIMIT_EXTENSION: 183}
    counters = await ledgers[0].counters("acme", DAY)
    assert counters.total.reserved == allowed_calls * MINIMAL
    assert counters.total.live_calls == allowed_calls


async def test_parallel_calls_of_many_extensions_never_exceed_the_tenant_daily_limit(
    ledgers: list[RedisLedger],
) -> None:
    allowed_calls = 23
    answers = await asyncio.gather(
        *(
            ledgers[i % 4].reserve(
                request(
                    call_id=f"c{i}",
                    extension=f"{i % 10}",
                    ext_daily_limit=10 * MINIMAL,
                    tenant_daily_limit=allowed_calls * MINIMAL,
                    **SHORT,
                )
            )
            for i in range(200)
        )
    )

    reasons = Counter(answer.reason for answer in answers)
    assert reasons[Reason.ALLOWED] == allowed_calls
    assert reasons[Reason.ALLOWED] + reasons[Reason.DAILY_LIMIT_TENANT] == 200
    counters = await ledgers[0].counters("acme", DAY)
    assert counters.total.reserved == allowed_calls * MINIMAL
    assert all(ext.reserved <= 10 * MINIMAL for ext in counters.extensions.values())


async def test_parallel_calls_never_exceed_the_concurrent_limits(
    ledgers: list[RedisLedger],
) -> None:
    limits = {"ext_concurrent_limit": 3, "tenant_concurrent_limit": 12}
    answers = await asyncio.gather(
        *(
            ledgers[i % 4].reserve(request(call_id=f"c{i}", extension=f"{i % 5}", **limits))
            for i in range(200)
        )
    )

    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == 12
    assert {a.reason for a in answers if not a.allowed} <= {
        Reason.CONCURRENT_LIMIT_EXTENSION,
        Reason.CONCURRENT_LIMIT_TENANT,
    }
    counters = await ledgers[0].counters("acme", DAY)
    assert counters.total.live_calls == 12
    assert all(ext.live_calls <= 3 for ext in counters.extensions.values())


def _reserve_in_a_process(
    redis_url: str,
    prefix: str,
    worker: int,
    limit: int,
    start: Event,
    out: multiprocessing.Queue[list[str]],
) -> None:
    async def run() -> list[str]:
        async with ledger_from_url(redis_url, prefix=prefix, timeout=5.0) as ledger:
            await ledger.ping()
            start.wait()
            answers = await asyncio.gather(
                *(
                    ledger.reserve(
                        request(call_id=f"p{worker}-{i}", ext_daily_limit=limit, **SHORT)
                    )
                    for i in range(50)
                )
            )
            return [answer.reason.value for answer in answers]

    out.put(asyncio.run(run()))


def test_four_processes_never_exceed_the_daily_limit(redis_url: str, key_prefix: str) -> None:
    allowed_calls = 29
    context = multiprocessing.get_context("fork")
    start = context.Event()
    out: multiprocessing.Queue[list[str]] = context.Queue()
    workers = [
        context.Process(
            target=_reserve_in_a_process,
            args=(redis_url, key_prefix, worker, allowed_calls * MINIMAL, start, out),
        )
        for worker in range(4)
    ]
    for process in workers:
        process.start()
    start.set()
    reasons = Counter(reason for _ in workers for reason in out.get(timeout=30))
    for process in workers:
        process.join(timeout=10)

    assert reasons == {"allowed": allowed_calls, "daily_limit_extension": 200 - allowed_calls}

    async def reserved() -> int:
        async with ledger_from_url(redis_url, prefix=key_prefix, timeout=2.0) as ledger:
            counters = await ledger.counters("acme", DAY)
            return counters.total.spent + counters.total.reserved

    assert asyncio.run(reserved()) == allowed_calls * MINIMAL


async def test_duplicate_settles_racing_settle_exactly_once(ledgers: list[RedisLedger]) -> None:
    await ledgers[0].reserve(request())
    results = await asyncio.gather(
        *(ledgers[i % 4].settle("acme", "call-1", 61, NOW + 70) for i in range(100))
    )

    outcomes = Counter(result.outcome for result in results)
    assert outcomes == {SettleOutcome.SETTLED: 1, SettleOutcome.ALREADY_SETTLED: 99}
    counters = await ledgers[0].counters("acme", DAY)
    assert (counters.total.spent, counters.total.reserved) == (call_cost(RATE, 61), 0)
    assert counters.total.live_calls == 0


async def test_concurrent_sweepers_sweep_each_call_once(ledgers: list[RedisLedger]) -> None:
    for i in range(60):
        await ledgers[0].reserve(request(call_id=f"c{i}", grace_seconds=0, **SHORT))

    sweeps = await asyncio.gather(
        *(ledgers[i % 4].sweep("acme", NOW + 100, limit=7) for i in range(12))
    )
    swept = [call.call_id for batch in sweeps for call in batch]

    assert sorted(swept) == sorted(f"c{i}" for i in range(60))
    counters = await ledgers[0].counters("acme", DAY)
    assert (counters.total.spent, counters.total.reserved) == (60 * MINIMAL, 0)
    assert counters.total.live_calls == 0


async def test_settles_racing_the_sweeper_end_at_the_real_cost(
    ledgers: list[RedisLedger],
) -> None:
    for i in range(40):
        await ledgers[0].reserve(request(call_id=f"c{i}", grace_seconds=0, max_call_seconds=60))

    _, settled = await asyncio.gather(
        asyncio.gather(ledgers[0].sweep("acme", NOW + 100), ledgers[1].sweep("acme", NOW + 100)),
        asyncio.gather(*(ledgers[i % 4].settle("acme", f"c{i}", i, NOW + 100) for i in range(40))),
    )

    outcomes = Counter(result.outcome for result in settled)
    assert set(outcomes) <= {SettleOutcome.SETTLED, SettleOutcome.SETTLED_AFTER_SWEEP}
    counters = await ledgers[0].counters("acme", DAY)
    assert counters.total.spent == sum(call_cost(RATE, i) for i in range(40))
    assert (counters.total.reserved, counters.total.live_calls) == (0, 0)
