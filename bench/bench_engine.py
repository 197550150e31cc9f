"""Engine micro-benchmark: authorize and settle in-process against the real Redis.

The engine is built exactly as ``guard serve`` builds it (``guard.service.build_services``, so
metrics, the event feed and the perimeter are in), on a throw-away SQLite configuration
(``bench.workload.seed_config``) and a Redis key prefix of its own, deleted afterwards. Calls come
from ``bench.workload.CallMix`` (the same mix as the FastAGI benchmark, refusals included) and are
turned into ``CallAttempt`` values the way the ``authorize`` route does. No FastAGI here: this is
the cost of the decision itself, split into its parts:

- ``policy``: ``guard.policy.evaluate`` alone (pure, no I/O);
- ``ledger``: ``RedisLedger.reserve`` then ``settle`` alone (two Lua round trips);
- ``engine``: ``authorize`` then, for an allowed call, ``settle`` through the whole engine, one
  call at a time (latency) and with ``--concurrency`` calls in flight (throughput).

    python -m bench.bench_engine --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

import redis

from bench.workload import CallMix, seed_config
from guard.agi.testing import environment_value
from guard.domain import CallAttempt
from guard.errors import StorageError
from guard.ledger.types import ReserveRequest
from guard.logs import setup_logging
from guard.policy import evaluate
from guard.schedule import tenant_day
from guard.service import Services, build_services
from guard.settings import load_settings
from guard.workers import run


def attempts(mix: CallMix, count: int, first: int = 0) -> list[tuple[CallAttempt, int]]:
    """``count`` call attempts of the mix, with the billsec each call will be settled with."""
    out = []
    for index in range(first, first + count):
        call = mix.call(index)
        script = environment_value(call.authorize, "network_script")
        query = {k: v[0] for k, v in parse_qs(script.partition("?")[2]).items()}
        attempt = CallAttempt(
            tenant=query["tenant"],
            extension=query["ext"],
            number=query["to"],
            source_ip=query["ip"],
            user_agent=query["ua"],
            call_id=call.uniqueid,
            linked_id="",
            caller_id=query["cid"],
            channel=environment_value(call.authorize, "channel"),
        )
        out.append((attempt, call.billsec))
    return out


def _report(name: str, seconds: Sequence[float], wall: float, count: int) -> None:
    ordered = sorted(seconds)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    print(
        f"{name:<34} {count / wall:>9.0f} /s   p50 {pct(0.5):7.1f} µs   p99 {pct(0.99):7.1f} µs"
        f"   max {ordered[-1] * 1e6:8.0f} µs",
        flush=True,
    )


async def _timed(
    items: Sequence[object], step: Callable[[object], Awaitable[object]]
) -> tuple[list[float], float]:
    latencies = []
    began = time.perf_counter()
    for item in items:
        started = time.perf_counter()
        await step(item)
        latencies.append(time.perf_counter() - started)
    return latencies, time.perf_counter() - began


async def bench(services: Services, mix: CallMix, calls: int, concurrency: int) -> None:
    engine, ledger = services.engine, services.ledger
    snapshot = services.snapshots.current
    batch = attempts(mix, calls)
    # Warm up: connections, scripts, caches.
    for attempt, billsec in attempts(mix, 500, first=10 * calls):
        if (await engine.authorize(attempt)).allowed:
            await engine.settle(attempt.tenant, attempt.call_id, billsec)

    now = datetime.now(UTC)
    policy_times = []
    began = time.perf_counter()
    for attempt, _ in batch:
        started = time.perf_counter()
        evaluate(snapshot, attempt, now)
        policy_times.append(time.perf_counter() - started)
    _report("policy.evaluate", policy_times, time.perf_counter() - began, len(batch))

    allowed = [(a, evaluate(snapshot, a, now)) for a, _ in batch]
    requests = []
    for attempt, policy in allowed:
        if policy.reason is None and policy.rate and policy.tenant and policy.extension:
            requests.append(
                ReserveRequest(
                    tenant=attempt.tenant,
                    extension=attempt.extension,
                    call_id="raw-" + attempt.call_id,
                    day=tenant_day(policy.tenant.timezone, time.time()),
                    now=time.time(),
                    rate=policy.rate,
                    number=attempt.number,
                    ext_daily_limit=policy.extension.daily_limit,
                    tenant_daily_limit=policy.tenant.daily_limit,
                    ext_concurrent_limit=None,
                    tenant_concurrent_limit=None,
                    max_call_seconds=3600,
                )
            )

    async def reserve_settle(item: object) -> None:
        assert isinstance(item, ReserveRequest)
        await ledger.reserve(item)
        await ledger.settle(item.tenant, item.call_id, 60, time.time())

    latencies, wall = await _timed(requests, reserve_settle)
    _report("ledger reserve+settle (raw)", latencies, wall, len(requests))

    store_errors = 0

    async def call(item: object) -> None:
        nonlocal store_errors
        assert isinstance(item, tuple)
        attempt, billsec = item
        if (await engine.authorize(attempt)).allowed:
            try:
                await engine.settle(attempt.tenant, attempt.call_id, billsec)
            except StorageError:  # too slow an answer: a real hangup handler would say "error"
                store_errors += 1

    half = len(batch) // 2
    latencies, wall = await _timed(batch[:half], call)
    _report("engine authorize(+settle), serial", latencies, wall, half)

    rest = iter(batch[half:])
    concurrent_latencies: list[float] = []

    async def worker() -> None:
        for item in rest:
            started = time.perf_counter()
            await call(item)
            concurrent_latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    _report(f"engine, {concurrency} in flight", concurrent_latencies, wall, len(batch) - half)
    await engine.drain()
    print(
        f"(median policy {statistics.median(policy_times) * 1e6:.1f} µs;"
        f" {len(requests)} of {len(batch)} calls allowed; {store_errors} settles timed out)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--extensions", type=int, default=50)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp:
        database_url = f"sqlite:///{Path(tmp) / 'guard.db'}"
        seed_config(database_url, args.tenants, args.extensions)
        settings = load_settings(
            database_url=database_url,
            redis_url=args.redis_url,
            redis_prefix=prefix,
            metrics_listen="",
            log_level="error",
        )
        setup_logging(settings.log_format, settings.log_level)
        services = build_services(settings)
        mix = CallMix(4573, args.tenants, args.extensions)

        async def go() -> None:
            try:
                await bench(services, mix, args.calls, args.concurrency)
            finally:
                await services.close()

        try:
            run(go())
        finally:
            client = redis.Redis.from_url(args.redis_url)
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
            client.close()


if __name__ == "__main__":
    main()
