"""Security checks: the FastAGI allow-list, and secrets that never reach a log or ``--json``.

The allow-list test connects from a second loopback address (127.0.0.2, via ``local_addr``) to a
guard that allows 127.0.0.1/32 only. The secrets test runs the real ``guard serve`` (debug logs,
JSON and text formats) with a database password, a Redis password (a private redis-server with
``requirepass``), an ARI password and a dashboard token in its environment, plays allowed, refused
and failing calls (Redis frozen for a moment, so errors carrying the store's URL are logged),
then greps everything it printed; ``guard config show --json`` and a ``guard serve`` that cannot
reach its database are checked the same way.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fault_support import GUARD_COMMAND, GuardServer, Phone, allowed, guard_env, seed
from ledger_support import RedisProcess, free_port

from guard.agi.testing import build_environment

pytestmark = pytest.mark.timeout(90)

DB_SECRET = "dbSecret-7f3a9c"
REDIS_SECRET = "redisSecret-51be0d"
ARI_SECRET = "ariSecret-c0ffee"
DASHBOARD_TOKEN = "dashToken-" + "8d2f" * 8
SECRETS = (DB_SECRET, REDIS_SECRET, ARI_SECRET, DASHBOARD_TOKEN)


async def test_allow_list_refuses_a_client_from_another_address(
    tmp_path: Path, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    seed(sqlite_url)
    port = free_port()
    env = guard_env(sqlite_url, redis_url, key_prefix, port, agi_allow="127.0.0.1/32")
    server = GuardServer(tmp_path, env).start()
    try:
        environment = build_environment(
            {
                "network": "yes",
                "network_script": "authorize?tenant=acme&ext=1001",
                "uniqueid": "9.1",
            }
        )
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        try:
            writer.write(environment)
            await writer.drain()
            refused = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:  # closed before it read our bytes: refused all the same
            refused = b""
        writer.close()
        served = await Phone(port).authorize("from-127.0.0.1")
    finally:
        server.stop()
    assert refused == b""  # closed without a single command: the dialplan fails closed
    assert allowed(served)
    assert "agi connection refused: address not allowed" in server.output
    assert "peer=127.0.0.2" in server.output


class LockedRedis(RedisProcess):
    """A private redis-server that wants a password (``requirepass``)."""

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=REDIS_SECRET, socket_timeout=2)


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = LockedRedis(tmp_path / "redis", "--requirepass", REDIS_SECRET).start()
    yield server
    server.stop()


def _with_password(pg_url: str) -> str:
    url = sa.make_url(pg_url).set(password=DB_SECRET)
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_reaches_the_logs_or_the_json_output(
    log_format: str, tmp_path: Path, pg_url: str, locked_redis: RedisProcess, key_prefix: str
) -> None:
    database_url = _with_password(pg_url)  # trust authentication: the password is not checked
    seed(database_url)
    port = free_port()
    redis_url = f"redis://:{REDIS_SECRET}@127.0.0.1:{locked_redis.port}/0"
    env = guard_env(
        database_url,
        redis_url,
        key_prefix,
        port,
        log_level="debug",
        log_format=log_format,
        ari_password=ARI_SECRET,
        dashboard_token=DASHBOARD_TOKEN,
    )
    server = GuardServer(tmp_path, env).start()
    phone = Phone(port)
    try:
        assert allowed(await phone.authorize("ok.1"))
        await phone.settle("ok.1", 12)
        assert not allowed(await phone.authorize("refused.1", user_agent="friendly-scanner"))
        locked_redis.pause()
        try:
            down = await phone.authorize("down.1")
        finally:
            locked_redis.resume()
        assert down.variables["GUARD_REASON"] == "store_unavailable"
    finally:
        server.stop()
    shown = await asyncio.to_thread(
        subprocess.run,
        [*GUARD_COMMAND, "config", "show", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "counter store redis://:***@127.0.0.1" in server.output
    assert '"redis_url": "redis://:***@127.0.0.1' in shown.stdout
    for secret in SECRETS:
        assert secret not in server.output, secret
        assert secret not in shown.stdout + shown.stderr, secret


def test_a_guard_that_cannot_reach_its_database_does_not_print_the_password(
    tmp_path: Path, key_prefix: str
) -> None:
    url = f"postgresql+psycopg2://guard:{DB_SECRET}@127.0.0.1:{free_port()}/guard"
    env = guard_env(url, "redis://127.0.0.1:6379/0", key_prefix, free_port())
    failed = subprocess.run(
        [*GUARD_COMMAND, "serve"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0
    assert "guard:***@127.0.0.1" in failed.stderr
    assert DB_SECRET not in failed.stdout + failed.stderr
