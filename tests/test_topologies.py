"""The engine on real Redis topologies: a Sentinel set and a 3-master Cluster, failed over mid-test.

Each topology runs as private ``redis-server`` processes on free loopback ports (Debian's
``redis-server``; ``--sentinel`` for the Sentinels, ``redis-cli --cluster create`` for the
Cluster). The core ledger operations run through the engine (reserve, settle, sweep, the
concurrent-call limit), then a steady flow of calls runs while the master holding the tenant is
killed. Decisions during the failover follow the fail mode (``store_unavailable``, nothing
allowed without a reservation), the same engine and ledger recover by themselves once a replica is
promoted, and the money adds up on the new master: spend equals the costs the settles reported,
each call counted once, nothing left reserved or live. Every wait is bounded and every process is
stopped by the fixtures, whatever happens.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from factories import LONDON, make_attempt, make_snapshot
from ledger_support import RedisProcess, count_scripts, free_port, wait_until

from guard.domain import Reason, Result
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import StorageError
from guard.events import EventBus
from guard.ledger import RedisLedger, ledger_from_url
from guard.ledger.keys import tenant_base
from guard.ledger.types import SettleOutcome
from guard.schedule import tenant_day

SERVICE = "guardsvc"
PREFIX = "topo"
TENANT = "acme"
#: Bound of one ledger operation here: loopback, but the machine may be busy.
TIMEOUT = 0.3
#: Longest wait for a failover to complete and the engine to allow calls again.
FAILOVER_WITHIN = 45.0
#: A replica's first sync starts at once (the default waits 5 s for more replicas).
NO_SYNC_DELAY = ("--repl-diskless-sync-delay", "0")
pytestmark = pytest.mark.timeout(150)


# ---- topologies ---------------------------------------------------------------------------------


@dataclass
class Topology:
    """Running redis-server processes and the URL Guard uses to reach them."""

    url: str
    processes: list[RedisProcess] = field(default_factory=list)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def _sentinel_config(path: Path, master: RedisProcess) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = path / "sentinel.conf"
    config.write_text(
        f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    return config


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[Topology]:
    """One master, one replica and three Sentinels (quorum 2) watching them."""
    master = RedisProcess(tmp_path / "master", *NO_SYNC_DELAY)
    topology = Topology("", [master])
    try:
        master.start()
        replica = RedisProcess(
            tmp_path / "replica", *NO_SYNC_DELAY, "--replicaof", "127.0.0.1", str(master.port)
        )
        topology.processes.append(replica)
        replica.start().ready(_synced)
        sentinels = []
        for index in range(3):
            home = tmp_path / f"sentinel{index}"
            sentinel = RedisProcess(home, "--sentinel", config_file=_sentinel_config(home, master))
            topology.processes.append(sentinel)
            sentinels.append(sentinel.start())
        for sentinel in sentinels:
            sentinel.ready(
                lambda c: (
                    len(c.sentinel_slaves(SERVICE)) == 1 and len(c.sentinel_sentinels(SERVICE)) == 2
                )
            )
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
        topology.url = f"redis+sentinel://{hosts}/{SERVICE}"
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Topology]:
    """A Redis Cluster of three masters, each with one replica."""
    topology = Topology("")
    try:
        for index in range(6):
            home = tmp_path / f"node{index}"
            node = RedisProcess(
                home,
                *NO_SYNC_DELAY,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(home / "nodes.conf"),
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",  # the bus port: port + 10000 may not exist
                str(free_port()),
            )
            topology.processes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in topology.processes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in topology.processes:
            node.ready(lambda c: c.cluster("info")["cluster_state"] == "ok" and _synced(c))
        topology.url = "redis+cluster://" + ",".join(addresses[:3])
        yield topology
    finally:
        topology.stop()


def _synced(client: redis.Redis) -> bool:
    """A master, or a replica whose first sync is done (else it can never be promoted)."""
    info = client.info("replication")
    return bool(info["role"] == "master" or info["master_link_status"] == "up")


def _master_of_tenant(topology: Topology) -> RedisProcess:
    """The cluster master that owns the slot of the tenant's hash tag."""
    alive = next(node for node in topology.processes if node.process is not None)
    with alive.client() as client:
        slot = client.cluster("keyslot", tenant_base(PREFIX, TENANT))
        for start, end, owner, *_ in client.cluster("slots"):
            if start <= slot <= end:
                port = int(owner[1])
                break
    return next(node for node in topology.processes if node.port == port)


def _sentinel_master(topology: Topology) -> RedisProcess:
    sentinel = topology.processes[2]
    with sentinel.client() as client:
        _, port = client.sentinel_get_master_addr_by_name(SERVICE)
    return next(node for node in topology.processes if node.port == int(port))


# ---- the engine on a topology -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Books:
    """What the calls saw: allowed and refused ids, and the cost every settle reported."""

    allowed: list[str] = field(default_factory=list)
    refused: dict[str, Reason] = field(default_factory=dict)
    unsettled: list[str] = field(default_factory=list)
    costs: dict[str, int] = field(default_factory=dict)


def _engine(ledger: RedisLedger, clock: Clock) -> Engine:
    return Engine(
        SnapshotHolder(make_snapshot()), ledger, EventBus(), EngineSettings(grace_seconds=5), clock
    )


async def _call(engine: Engine, books: Books, call_id: str, billsec: int = 30) -> None:
    """One call of extension 1002 to London: authorize, then settle if allowed."""
    attempt = make_attempt(extension="1002", number=LONDON, call_id=call_id)
    decision = await engine.authorize(attempt)
    if decision.result is Result.DENY:
        books.refused[call_id] = decision.reason
        return
    assert decision.reason is Reason.ALLOWED, decision
    books.allowed.append(call_id)
    try:
        settled = await engine.settle(TENANT, call_id, billsec)
    except StorageError:
        books.unsettled.append(call_id)
    else:
        books.costs[call_id] = settled.cost


async def _core_operations(engine: Engine, ledger: RedisLedger, clock: Clock) -> None:
    """Reserve, settle exactly once, sweep an expired reservation, hold the concurrent limit."""
    books = Books()
    for index in range(5):
        await _call(engine, books, f"core-{index}")
    assert len(books.allowed) == 5 and not books.refused and not books.unsettled
    again = await engine.settle(TENANT, "core-0", 30)
    assert again.cost == books.costs["core-0"]  # already settled: the same cost, not twice

    # Extension 1001 may hold two calls: of five at once, exactly two get through.
    attempts = [make_attempt(call_id=f"limit-{i}") for i in range(5)]
    decisions = await asyncio.gather(*(engine.authorize(a) for a in attempts))
    reasons = sorted(d.reason for d in decisions)
    assert reasons.count(Reason.ALLOWED) == 2
    assert reasons.count(Reason.CONCURRENT_LIMIT_EXTENSION) == 3

    # Their reservations expire unsettled: the sweeper charges them in full, once.
    clock.offset = 3_600 + 60
    swept = await engine.sweep()
    assert sorted(s.call_id for s in swept) == sorted(
        a.call_id for a, d in zip(attempts, decisions, strict=True) if d.allowed
    )
    assert await engine.sweep() == []
    clock.offset = 0.0
    await engine.drain()
    counters = await ledger.counters(TENANT, tenant_day("Europe/London", clock()))
    assert counters.total.live_calls == 0 and counters.total.reserved == 0
    assert counters.total.spent == sum(books.costs.values()) + sum(s.charged for s in swept)


async def _through_failover(engine: Engine, ledger: RedisLedger, kill: RedisProcess) -> None:
    """Calls flow while ``kill`` dies; refusals follow the fail mode; the money adds up after."""
    books = Books()
    day = tenant_day("Europe/London", time.time())
    before = (await ledger.counters(TENANT, day)).total.spent
    stop = asyncio.Event()

    async def flow() -> None:
        index = 0
        while not stop.is_set():
            await _call(engine, books, f"flow-{index}")
            index += 1
            await asyncio.sleep(0.005)

    runner = asyncio.create_task(flow())
    try:
        await _until(lambda: len(books.allowed) >= 20, 10.0)
        kill.stop()
        await _until(lambda: bool(books.refused), 15.0)
        seen = len(books.allowed)
        await _until(lambda: len(books.allowed) >= seen + 20, FAILOVER_WITHIN)
    finally:
        stop.set()
        await runner
    # Decisions during the failover: refused for the store only, nothing else.
    assert set(books.refused.values()) == {Reason.STORE_UNAVAILABLE}
    # Hangup handlers whose settle failed run again (as Asterisk's would, or the sweeper).
    for call_id in books.unsettled:
        books.costs[call_id] = (await engine.settle(TENANT, call_id, 30)).cost
    await engine.drain()  # reservations a timed-out reserve may have made are released
    counters = await ledger.counters(TENANT, day)
    assert counters.total.live_calls == 0
    assert counters.total.reserved == 0
    assert counters.total.spent - before == sum(books.costs.values())


async def _until(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(0.05)


async def test_sentinel_set_serves_the_ledger_and_survives_a_master_kill(
    sentinel_set: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts run on the multiplexed connection, which follows the master the Sentinels
    name."""
    clock = Clock()
    async with ledger_from_url(sentinel_set.url, prefix=PREFIX, timeout=TIMEOUT) as ledger:
        ran = count_scripts(ledger, monkeypatch)
        engine = _engine(ledger, clock)
        await _core_operations(engine, ledger, clock)
        before_failover = len(ran)
        old_master = _sentinel_master(sentinel_set)
        await _through_failover(engine, ledger, old_master)
        assert _sentinel_master(sentinel_set) is not old_master
    assert 0 < before_failover < len(ran)


async def test_cluster_serves_the_ledger_and_survives_a_master_kill(
    cluster: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts run on a multiplexed connection to the tenant's master, then to the replica
    promoted in its place."""
    clock = Clock()
    async with ledger_from_url(cluster.url, prefix=PREFIX, timeout=TIMEOUT) as ledger:
        ran = count_scripts(ledger, monkeypatch)
        engine = _engine(ledger, clock)
        await _core_operations(engine, ledger, clock)
        before_failover = len(ran)
        old_master = _master_of_tenant(cluster)
        await _through_failover(engine, ledger, old_master)
        wait_until(lambda: _master_of_tenant(cluster) is not old_master, 5.0)
    assert 0 < before_failover < len(ran)


def _move_slot(topology: Topology, slot: int, source: RedisProcess, target: RedisProcess) -> None:
    """Reshard ``slot`` from ``source`` to ``target`` with its keys, as ``redis-cli --cluster
    reshard`` does, and tell every master."""
    with source.client() as src, target.client() as dst:
        source_id, target_id = src.cluster("myid"), dst.cluster("myid")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        for node in topology.processes:
            with node.client() as client:
                if client.info("replication")["role"] == "master":
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_cluster_resharding_moves_a_tenant_and_its_calls_settle_once_on_the_new_master(
    cluster: Topology,
) -> None:
    """The ledger knows the old owner of the tenant's slot: its MOVED answer (the script did not
    run there) sends the call once more, to the new owner, where the reservation now lives."""
    clock = Clock()
    async with ledger_from_url(cluster.url, prefix=PREFIX, timeout=TIMEOUT) as ledger:
        engine = _engine(ledger, clock)
        attempts = [make_attempt(extension="1002", call_id=f"moving-{i}") for i in range(3)]
        assert all([(await engine.authorize(a)).allowed for a in attempts])
        source = _master_of_tenant(cluster)
        target = next(
            node
            for node in cluster.processes
            if node is not source and node.client().info("replication")["role"] == "master"
        )
        with source.client() as client:
            slot = client.cluster("keyslot", tenant_base(PREFIX, TENANT))
        _move_slot(cluster, slot, source, target)
        wait_until(lambda: _master_of_tenant(cluster) is target, 10.0)

        settled = [await engine.settle(TENANT, a.call_id, 61) for a in attempts]
        again = [await engine.settle(TENANT, a.call_id, 61) for a in attempts]
        counters = await ledger.counters(TENANT, tenant_day("Europe/London", clock()))
    assert {result.outcome for result in settled} == {SettleOutcome.SETTLED}
    assert {result.outcome for result in again} == {SettleOutcome.ALREADY_SETTLED}
    costs = [result.cost for result in settled]
    assert costs[0] > 0 and len(set(costs)) == 1
    assert counters.total.reserved == 0 and counters.total.live_calls == 0
    assert counters.total.spent == sum(costs)
    with target.client() as client:
        assert client.cluster("countkeysinslot", slot) > 0


async def test_sentinel_failover_command_moves_the_master_without_losing_a_settle(
    sentinel_set: Topology,
) -> None:
    """A planned ``SENTINEL FAILOVER``: calls reserved before it settle on the new master (the
    old one, now a replica, drops its clients or answers READONLY: either way the multiplexed
    connection asks the Sentinels again)."""
    clock = Clock()
    async with ledger_from_url(sentinel_set.url, prefix=PREFIX, timeout=TIMEOUT) as ledger:
        engine = _engine(ledger, clock)
        attempts = [make_attempt(extension="1002", call_id=f"open-{i}") for i in range(3)]
        decisions = [await engine.authorize(a) for a in attempts]
        assert all(d.allowed for d in decisions)
        old_master = _sentinel_master(sentinel_set)
        with old_master.client() as client:
            client.execute_command("WAIT", 1, 2000)
        with sentinel_set.processes[2].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_until(lambda: _sentinel_master(sentinel_set) is not old_master, FAILOVER_WITHIN)
        wait_until(lambda: old_master.client().info("replication")["role"] == "slave", 20.0)
        deadline = time.monotonic() + FAILOVER_WITHIN
        costs: dict[str, int] = {}
        for attempt in attempts:
            while attempt.call_id not in costs:
                try:
                    result = await engine.settle(TENANT, attempt.call_id, 61)
                except StorageError:
                    assert time.monotonic() < deadline, "the ledger did not recover in time"
                    await asyncio.sleep(0.1)
                else:
                    costs[attempt.call_id] = result.cost
        counters = await ledger.counters(TENANT, tenant_day("Europe/London", clock()))
    assert counters.total.reserved == 0 and counters.total.live_calls == 0
    assert counters.total.spent == sum(costs.values()) > 0
