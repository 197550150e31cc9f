"""``guard serve --workers N``: the pre-fork parent, its workers on one port, restarts and drain."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
from pathlib import Path

import pytest
from fault_support import EXT_CONCURRENT, Books, GuardServer, Phone, allowed, guard_env, seed
from ledger_support import free_port

from guard.errors import ConfigurationError
from guard.settings import load_settings
from guard.workers import EXIT_CONFIG, check_workers, serve_forever, worker_settings

pytestmark = pytest.mark.timeout(90)
_PID = re.compile(r'"guard worker started" worker=\d+ pid=(\d+)')


@pytest.mark.parametrize(
    ("workers", "overrides", "error"),
    [
        (0, {}, "at least 1"),
        (2, {"redis_url": "memory://"}, "shared counter store"),
        (2, {"agi_listen": "127.0.0.1:0"}, "fixed ports"),
    ],
)
def test_unusable_worker_settings_are_refused(
    workers: int, overrides: dict[str, str], error: str
) -> None:
    settings = load_settings({}, **{"redis_url": "redis://127.0.0.1:6379/0", **overrides})
    with pytest.raises(ConfigurationError, match=error):
        check_workers(settings, workers)


def test_ari_runs_in_one_process_only() -> None:
    settings = load_settings({}, redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match="once"):
        serve_forever(settings, workers=2, ari=True)


def test_each_worker_serves_metrics_on_its_own_port() -> None:
    settings = load_settings({}, metrics_listen="127.0.0.1:9573")
    assert worker_settings(settings, 0) == settings
    second = worker_settings(settings, 1)
    assert second.metrics_listen == ("127.0.0.1", 9574)
    assert dataclasses.replace(second, metrics_listen=settings.metrics_listen) == settings
    off = load_settings({}, metrics_listen="")
    assert worker_settings(off, 3) == off


def _worker_pids(server: GuardServer) -> list[int]:
    return [int(pid) for pid in _PID.findall(server.output)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_workers_share_the_port_survive_a_worker_kill_and_drain_on_sigterm(
    tmp_path: Path, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    seed(sqlite_url)
    port = free_port()
    env = guard_env(sqlite_url, redis_url, key_prefix, port)
    server = GuardServer(tmp_path, env, "--workers", "2").start(serving=2)
    phone = Phone(port)
    try:
        first, second = _worker_pids(server)
        for round_ in range(3):
            calls = [f"w{round_}.{i}" for i in range(EXT_CONCURRENT)]
            records = await asyncio.gather(*(phone.authorize(call_id) for call_id in calls))
            assert all(allowed(r) for r in records), [r.variables for r in records]
            for call_id in calls:
                assert (await phone.settle(call_id, 7)).variables["GUARD_SETTLED"] == "settled"
            if round_ == 0:
                os.kill(first, signal.SIGKILL)
                await asyncio.to_thread(server.wait_for, "guard worker started", count=3)
                await asyncio.to_thread(server.wait_for, "guard serving", count=3)
        assert "guard worker died unexpectedly: restarting it" in server.output
        pids = _worker_pids(server)
        assert len(pids) == 3 and pids[1] == second and _alive(pids[2])
        server.signal(signal.SIGTERM)
        status = await asyncio.to_thread(server.wait, 30)
    finally:
        server.stop()
    assert status == 0
    assert not any(_alive(pid) for pid in pids)
    Books.read(redis_url, key_prefix).check({})


async def test_a_worker_configuration_error_stops_the_parent(
    tmp_path: Path, sqlite_url: str, key_prefix: str
) -> None:
    seed(sqlite_url)
    env = guard_env(sqlite_url, "redis+cluster://127.0.0.1:1/3", key_prefix, free_port())
    server = GuardServer(tmp_path, env, "--workers", "2").launch()
    try:
        status = await asyncio.to_thread(server.wait, 60)
    finally:
        server.stop()
    assert status == EXIT_CONFIG, server.output
    assert "no database number in a cluster" in server.output
