"""Shared fixtures: the real local Redis and PostgreSQL, isolated per test.

Redis: every test gets its own key prefix (``guard-test-<hex>``) and its keys are deleted after.
PostgreSQL: every test that asks gets a database of its own, dropped after.
A service that cannot be reached fails the test loudly: nothing here skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa

from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.shadow import shadow_prefix

REDIS_URL = os.environ.get("GUARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get(
    "GUARD_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _require_redis() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:  # pragma: no cover - environment failure
        pytest.fail(f"the test Redis at {REDIS_URL} is not reachable: {exc}")
    return client


@pytest.fixture
def redis_url() -> str:
    _require_redis()
    return REDIS_URL


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A Redis key prefix unique to this test; every key under it is deleted afterwards."""
    prefix = f"guard-test-{uuid.uuid4().hex[:12]}"
    client = _require_redis()
    yield prefix
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
async def async_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'guard.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    name = f"guard_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - environment failure
        pytest.fail(f"the test PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "asterisk").is_dir():
        pytest.fail(
            f"../shared/asterisk not found at {SHARED}: CI must put shared/ beside the repo"
        )
    return SHARED


@pytest.fixture
async def live(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    """The live counters under this test's key prefix."""
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


@pytest.fixture
async def shadow(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    """The shadow counters beside ``live`` (``guard.shadow``); their keys are deleted afterwards."""
    prefix = shadow_prefix(key_prefix)
    store = ledger_from_url(redis_url, prefix=prefix, timeout=1.0)
    yield store
    await store.close()
    client = _require_redis()
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()
