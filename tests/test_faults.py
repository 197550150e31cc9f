"""Guard under failure: Redis stopped or paused under load, SQL gone while serving, Guard itself
SIGKILLed with calls up, and SIGTERM with sessions in flight.

Everything runs on loopback against real processes: a private ``redis-server`` (with an
always-fsynced append-only file, so a restart keeps what it acknowledged), a PostgreSQL database
of the test's own, and ``guard serve`` either in the test's event loop or as a child process.
Each scenario is bounded in time and ends by checking the money with ``Books.check``: spend
equals the settled costs plus the swept reservations, each call counted once, nothing left
reserved or live, no limit passed.

    python -m pytest tests/test_faults.py -k restart    # one scenario
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner, Result
from fault_support import (
    EXT_CONCURRENT,
    UK,
    Books,
    GuardServer,
    Phone,
    allowed,
    guard_env,
    seed,
    wait_until_closed,
)
from ledger_support import RedisProcess, free_port

from guard.cli import cli
from guard.money import call_cost
from guard.service import serve
from guard.settings import load_settings

pytestmark = pytest.mark.timeout(90)


# ---- Guard in the test's loop, on a private Redis ------------------------------------------------


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server whose every acknowledged write survives a kill and restart."""
    server = RedisProcess(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def serving(database_url: str, redis_url: str, prefix: str) -> AsyncIterator[int]:
    """``guard serve`` in this event loop; yields its FastAGI port, drains on exit."""
    port = free_port()
    env = guard_env(database_url, redis_url, prefix, port, redis_timeout_ms="200")
    settings = load_settings(env)
    started, stop = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, drain_seconds=5, started=started, until=stop))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        waiter.cancel()
        await task  # raises what stopped it
        raise AssertionError("guard serve did not start")
    try:
        yield port
    finally:
        stop.set_result(None)
        await asyncio.wait_for(task, 20)


@dataclass
class Traffic:
    """Calls of extension 1001, several at once, each settled a moment after it is allowed."""

    phone: Phone
    settled: dict[str, int] = field(default_factory=dict)
    refused: list[tuple[float, str]] = field(default_factory=list)
    allowed_at: list[float] = field(default_factory=list)
    authorize_seconds: list[tuple[float, float]] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    up: int = 0
    most_up: int = 0

    async def line(self, name: str, stop: asyncio.Event, draw: random.Random) -> None:
        index = 0
        while not stop.is_set():
            call_id = f"{name}.{index}"
            index += 1
            started = time.monotonic()
            record = await self.phone.authorize(call_id)
            self.authorize_seconds.append((started, time.monotonic() - started))
            if not allowed(record):
                self.refused.append((started, record.variables.get("GUARD_REASON", "")))
                await asyncio.sleep(0.02)
                continue
            self.allowed_at.append(started)
            self.up += 1
            self.most_up = max(self.most_up, self.up)
            await asyncio.sleep(draw.uniform(0, 0.05))
            billsec = draw.randrange(0, 90)
            self.up -= 1  # the channel hangs up; its hangup handler settles
            outcome = (await self.phone.settle(call_id, billsec)).variables.get("GUARD_SETTLED")
            if outcome == "settled":
                self.settled[call_id] = call_cost(UK, billsec)
            else:
                self.unsettled.append(call_id)

    async def run_while(
        self, fault: Coroutine[Any, Any, None], lines: int = 6, within: float = 20.0
    ) -> float:
        """Run ``lines`` phones through ``fault`` (a coroutine) until a call is allowed again;
        the time the fault ended. Calls whose settle failed hold their slots until swept."""
        stop = asyncio.Event()
        draw = random.Random(5)
        phones = [asyncio.create_task(self.line(f"l{i}", stop, draw)) for i in range(lines)]
        try:
            await fault
            ended = time.monotonic()
            deadline = ended + within
            while not any(at > ended for at in self.allowed_at):
                assert time.monotonic() < deadline, "no call allowed after the fault"
                await asyncio.sleep(0.05)
            return ended
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*phones), 30)


@pytest.mark.parametrize("fault", ["restart", "pause"])
async def test_redis_fault_under_load_refuses_then_recovers_and_the_money_adds_up(
    fault: str, durable_redis: RedisProcess, sqlite_url: str, key_prefix: str
) -> None:
    """Redis killed and restarted (or frozen with SIGSTOP) while six phones call: calls are
    refused with ``store_unavailable`` within the timeout, then allowed again, by the same guard."""
    seed(sqlite_url, max_call_seconds=4)
    window: list[float] = []

    async def outage() -> None:
        await asyncio.sleep(1.0)
        window.append(time.monotonic())
        if fault == "restart":
            durable_redis.stop()
            await asyncio.sleep(1.0)
            durable_redis.start()
        else:
            durable_redis.pause()
            await asyncio.sleep(1.0)
            durable_redis.resume()

    async with serving(sqlite_url, durable_redis.url, key_prefix) as port:
        traffic = Traffic(Phone(port))
        window.append(await traffic.run_while(outage()))
        # Hangups that could not be settled are charged by the sweeper (4 s calls + 1 s grace).
        books = await asyncio.to_thread(wait_until_closed, durable_redis.url, key_prefix, 20)
    start, end = window
    during = {reason for at, reason in traffic.refused if start <= at <= end}
    assert "store_unavailable" in during
    assert {reason for _, reason in traffic.refused} <= {
        "store_unavailable",
        "concurrent_limit_extension",
    }
    assert traffic.most_up <= EXT_CONCURRENT
    # Authorize never waits for a dead store past its timeout (200 ms) plus the session's work.
    assert max(seconds for _, seconds in traffic.authorize_seconds) < 2.0
    books.check(traffic.settled)
    assert set(traffic.unsettled) <= set(books.closed)


# ---- SQL gone while serving --------------------------------------------------------------------


def _database_name(url: str) -> str:
    return sa.make_url(url).database or ""


def _allow_connections(admin_url: str, database: str, allow: bool) -> None:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {allow}'))
            if not allow:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": database},
                )
    finally:
        engine.dispose()


def _cli(database_url: str, prefix: str, *args: str) -> Result:
    """The admin CLI in this process (the way an admin runs it, without a new interpreter)."""
    env = guard_env(database_url, "redis://127.0.0.1:6379/0", prefix, 1)
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


async def test_sql_down_keeps_the_snapshot_serving_and_cli_writes_fail_cleanly(
    pg_url: str, redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import PG_ADMIN_URL

    caplog.set_level(logging.INFO, logger="guard.engine")
    seed(pg_url)
    database = _database_name(pg_url)
    async with serving(pg_url, redis_url, key_prefix) as port:
        phone = Phone(port)
        assert allowed(await phone.authorize("before"))
        await phone.settle("before", 30)
        _allow_connections(PG_ADMIN_URL, database, False)
        try:
            # An admin change elsewhere bumps the version: the reload fails, the old snapshot
            # keeps serving.
            with redis.Redis.from_url(redis_url) as client:
                client.incr(f"{key_prefix}:config:version", 1000)
            deadline = time.monotonic() + 10
            while not any("snapshot reload failed" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the reload was never tried"
                await asyncio.sleep(0.05)
            during = await phone.authorize("during")
            assert allowed(during), during.variables
            await phone.settle("during", 45)
            write = await asyncio.to_thread(
                _cli, pg_url, key_prefix, "tenant", "set", "acme", "--daily", "60"
            )
            assert write.exit_code == 1, write.output
            assert write.stderr.startswith("error: config store "), write.stderr
            assert "unreachable" in write.stderr and write.stdout == ""
        finally:
            _allow_connections(PG_ADMIN_URL, database, True)
        write = await asyncio.to_thread(
            _cli, pg_url, key_prefix, "tenant", "set", "acme", "--daily", "60"
        )
        assert write.exit_code == 0, write.output
        deadline = time.monotonic() + 10
        while not any("snapshot reloaded" in r.getMessage() for r in caplog.records):
            failures = [r for r in caplog.records if "reload failed" in r.getMessage()]
            assert time.monotonic() < deadline, getattr(failures[-1], "guard_fields", None)
            await asyncio.sleep(0.05)
        assert allowed(await phone.authorize("after"))
        await phone.settle("after", 10)
    Books.read(redis_url, key_prefix).check(
        {"before": call_cost(UK, 30), "during": call_cost(UK, 45), "after": call_cost(UK, 10)}
    )


# ---- Guard itself killed or stopped --------------------------------------------------------------


async def test_sigkill_with_calls_up_then_restart_reconciles_every_cent(
    tmp_path: Path, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    """Four calls are up when Guard is SIGKILLed. A new Guard settles the late hangups of two,
    the sweeper charges the two never reported, and one of those is corrected by a hangup that
    arrives after the sweep."""
    seed(sqlite_url, max_call_seconds=3)
    port = free_port()
    env = guard_env(sqlite_url, redis_url, key_prefix, port)
    first = GuardServer(tmp_path, env).start()
    phone = Phone(port)
    try:
        records = [await phone.authorize(f"up.{i}") for i in range(EXT_CONCURRENT)]
        assert all(allowed(r) for r in records), [r.variables for r in records]
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        first.stop()
    second = GuardServer(tmp_path, env).start()
    try:
        settled = {}
        for call_id, billsec in (("up.0", 2), ("up.1", 0)):
            outcome = (await phone.settle(call_id, billsec)).variables["GUARD_SETTLED"]
            assert outcome == "settled"
            settled[call_id] = call_cost(UK, billsec)
        books = await asyncio.to_thread(wait_until_closed, redis_url, key_prefix, 15)
        assert {books.closed[call_id]["state"] for call_id in ("up.2", "up.3")} == {"swept"}
        late = await phone.settle("up.3", 2)
        assert late.variables["GUARD_SETTLED"] == "settled_after_sweep"
        settled["up.3"] = call_cost(UK, 2)
    finally:
        assert second.stop() == 0
    Books.read(redis_url, key_prefix).check(settled)


async def test_sigterm_drains_sessions_in_flight_and_refuses_new_ones(
    tmp_path: Path, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    seed(sqlite_url)
    port = free_port()
    server = GuardServer(tmp_path, guard_env(sqlite_url, redis_url, key_prefix, port)).start()
    phone = Phone(port)
    try:
        # A slow Asterisk: each of the six replies of an authorize takes 0.25 s.
        calls = [
            asyncio.create_task(phone.authorize(f"slow.{i}", reply_delay=0.25)) for i in range(4)
        ]
        await asyncio.sleep(0.4)
        server.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        records = await asyncio.wait_for(asyncio.gather(*calls), 15)
        status = await asyncio.to_thread(server.wait, 15)
    finally:
        server.stop()
    assert status == 0
    assert all(r.closed_by_server and allowed(r) for r in records), [r.variables for r in records]
    assert "agi shutdown cancelled sessions" not in server.output
    # Nothing was lost: the four calls hold their reservations for their hangups (or the sweeper).
    books = Books.read(redis_url, key_prefix)
    assert books.open_calls == 4 and books.live == 4 and books.reserved > 0
