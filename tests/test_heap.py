"""``guard.heap``: a serving process keeps its snapshot out of full collections, and still frees
the snapshot a reload replaces.

Freezing is process-wide, so the checks run in a child interpreter, never in the test process.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from fault_support import TENANT, GuardServer, Phone, allowed, guard_env, seed
from ledger_support import free_port

from guard.config import db
from guard.config import repository as repo
from guard.config.models import Base

pytestmark = pytest.mark.timeout(120)

EXTENSIONS = 5_000

CHILD = textwrap.dedent(
    """
    import gc, json, sys
    from guard import heap
    from guard.config import db, loader

    engine = db.make_engine(sys.argv[1])
    serving = loader.build_snapshot(engine)
    frozen_at_start = heap.freeze_after_startup()
    walked_after_start = len(gc.get_objects())  # what a full collection still walks
    reloaded = loader.build_snapshot(engine)  # a reload: a whole new snapshot
    frozen_with_both = heap.freeze_after_reload()
    serving = reloaded  # the holder swaps: the old snapshot has no other reference
    del reloaded
    print(json.dumps({
        "frozen_at_start": frozen_at_start,
        "walked_after_start": walked_after_start,
        "frozen_with_both": frozen_with_both,
        "frozen_after_swap": gc.get_freeze_count(),
        "extensions": len(serving.extensions),
    }))
    """
)


def _seed_extensions(url: str) -> None:
    """One tenant with ``EXTENSIONS`` extensions: the snapshot objects the collector tracks (a
    rate deck is stored column-wise and adds almost none)."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        repo.add_tenant(engine, "big", actor="test", timezone="UTC")
        tables = Base.metadata.tables
        with engine.begin() as connection:
            tenant_id = connection.execute(sa.select(tables["tenants"].c.id)).scalar_one()
            rows = [{"tenant_id": tenant_id, "name": str(1000 + i)} for i in range(EXTENSIONS)]
            connection.execute(sa.insert(tables["extensions"]), rows)
            connection.execute(sa.update(tables["config_meta"]).values(value=2))
    finally:
        engine.dispose()


def test_frozen_snapshot_is_not_walked_and_a_replaced_one_is_freed(sqlite_url: str) -> None:
    _seed_extensions(sqlite_url)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, sqlite_url],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    figures = eval(done.stdout)
    assert figures["extensions"] == EXTENSIONS
    one_snapshot = figures["frozen_with_both"] - figures["frozen_at_start"]
    # The deck's objects are frozen: a full collection walks only what came after.
    assert figures["frozen_at_start"] > one_snapshot > EXTENSIONS
    assert figures["walked_after_start"] < 1_000
    # Reference counting freed the replaced snapshot although it was frozen (no cycles in it):
    # what stays frozen is the serving one, not both.
    assert figures["frozen_after_swap"] - figures["frozen_at_start"] < one_snapshot / 10


async def test_guard_serve_freezes_once_serving_and_still_reloads(
    tmp_path: Path, sqlite_url: str, redis_url: str, key_prefix: str
) -> None:
    seed(sqlite_url)
    port = free_port()
    server = GuardServer(tmp_path, guard_env(sqlite_url, redis_url, key_prefix, port)).start()
    try:
        frozen = re.search(r'"guard serving".* frozen_objects=(\d+)', server.output)
        assert frozen is not None and int(frozen[1]) > 10_000, server.output
        engine = db.make_engine(sqlite_url)
        try:
            repo.add_extension(engine, TENANT, "1002", actor="test", daily_limit=500)
        finally:
            engine.dispose()
        await asyncio.to_thread(server.wait_for, "snapshot reloaded")
        phone = Phone(port)  # it keeps the channel variables between the two sessions
        record = await phone.authorize("heap-1", ext="1002")
        assert allowed(record), record.variables
        assert (await phone.settle("heap-1", 3)).variables["GUARD_SETTLED"] == "settled"
    finally:
        server.stop()
