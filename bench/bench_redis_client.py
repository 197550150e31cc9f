"""Benchmark of the ledger's two Redis clients: redis-py's pool and the multiplexed connection.

Both run the same Lua script (as large as ``reserve``'s call: two keys, 21 arguments) from
``--concurrency`` tasks at once against the real Redis, on uvloop like ``guard serve``. Reported
per client: this process's CPU time per script call (what Guard pays; Redis's own time is not
in it) and calls a second, medians over ``--runs`` runs, and the ratio between the clients.
``--redis-url`` may be ``redis://``, ``rediss://``, ``unix://`` or, to compare redis-py's
cluster client with ``guard.ledger.cluster``, ``redis+cluster://host:port[,host:port…]``.

    python -m bench.bench_redis_client --calls 20000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from guard.ledger.cluster import ClusterScripts
from guard.ledger.multiplex import MultiplexedConnection
from guard.ledger.storage import split_netloc
from guard.workers import run

SCRIPT = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], total)
return {total, 'allowed', #ARGV}
"""
ARGS: list[str | int] = [1, "field", *(f"argument-{i}" for i in range(19))]

Call = Callable[[], Awaitable[Any]]


async def _measure(call: Call, calls: int, concurrency: int) -> tuple[float, float]:
    """CPU µs per call and calls per second for ``calls`` calls from ``concurrency`` tasks."""
    await call()  # connect and load the script
    remaining = iter(range(calls))

    async def worker() -> None:
        for _ in remaining:
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / calls * 1e6, calls / wall


def _cluster_nodes(url: str) -> list[tuple[str, int]] | None:
    """The startup nodes of a ``redis+cluster://`` URL, as the ledger reads them; ``None`` for
    any other URL."""
    scheme, _, rest = url.partition("://")
    if scheme != "redis+cluster":
        return None
    return split_netloc(rest, 6379)[2]


async def _redis_py(url: str, keys: list[str], calls: int, concurrency: int) -> tuple[float, float]:
    nodes = _cluster_nodes(url)
    client: Redis | RedisCluster
    if nodes is None:
        client = Redis.from_url(url, decode_responses=True, protocol=2)
    else:
        startup = [ClusterNode(host, port) for host, port in nodes]
        client = RedisCluster(startup_nodes=startup, decode_responses=True, protocol=2)
    script = client.register_script(SCRIPT)
    try:
        return await _measure(lambda: script(keys=keys, args=ARGS), calls, concurrency)
    finally:
        await client.aclose()


async def _multiplexed(
    url: str, keys: list[str], calls: int, concurrency: int
) -> tuple[float, float]:
    nodes = _cluster_nodes(url)
    connection: MultiplexedConnection | ClusterScripts = (
        MultiplexedConnection.from_url(url) if nodes is None else ClusterScripts(nodes)
    )
    sha = hashlib.sha1(SCRIPT.encode()).hexdigest()  # the first call loads it (NOSCRIPT)
    try:
        return await _measure(
            lambda: connection.evalsha(sha, SCRIPT, keys, ARGS), calls, concurrency
        )
    finally:
        await connection.aclose()


CLIENTS = {"redis-py": _redis_py, "multiplexed": _multiplexed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    prefix = f"bench-client-{uuid.uuid4().hex[:8]}"
    keys = [f"{prefix}:{{t}}:total", f"{prefix}:{{t}}:last"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
    try:
        for _ in range(args.runs):
            for name, client in CLIENTS.items():
                results[name].append(
                    run(client(args.redis_url, keys, args.calls, args.concurrency))
                )
    finally:
        nodes = _cluster_nodes(args.redis_url)
        if nodes is None:
            with redis.Redis.from_url(args.redis_url) as cleanup:
                cleanup.delete(*keys)
        else:
            with redis.RedisCluster(*nodes[0]) as cluster:
                cluster.delete(*keys)
    medians = {
        name: (
            statistics.median(cpu for cpu, _ in runs),
            statistics.median(rate for _, rate in runs),
        )
        for name, runs in results.items()
    }
    print(f"medians over {args.runs} runs, {args.calls} calls, {args.concurrency} in flight")
    print("| client | CPU µs / script call | calls/s |")
    print("|---|---:|---:|")
    for name, (cpu, rate) in medians.items():
        print(f"| {name} | {cpu:.1f} | {rate:.0f} |")
    base_cpu, base_rate = medians["redis-py"]
    cpu, rate = medians["multiplexed"]
    print(f"multiplexed / redis-py: CPU {cpu / base_cpu:.2f}x, throughput {rate / base_rate:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
