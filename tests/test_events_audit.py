"""Events reach the log, the audit table and the alerts once each, even across an SQL outage."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import sqlalchemy as sa
from factories import make_attempt, make_snapshot

from guard.alerts import Alert, AlertDispatcher
from guard.config.audit import audit_writer
from guard.config.db import make_engine, upgrade
from guard.config.repository import list_audit_events
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.events import Event, EventBus, EventKind
from guard.ledger import ledger_from_url
from guard.ledger.redis_ledger import RedisLedger
from guard.logs import TextFormatter
from guard.perimeter import Perimeter, PerimeterSettings

HOSTILE_UA = (
    'Evil", "9999", "x" ip=6.6.6.6 %0A\nkind=refused reason=scanner_user_agent src=6.6.6.6 '
)


async def wait_for(check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds (at most 10 s)."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached within 10 s")


def _rows(engine: sa.Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as connection:
        return [
            (row.kind, row.reason, row.call_id)
            for row in connection.execute(sa.text("SELECT kind, reason, call_id FROM audit_events"))
        ]


@pytest.fixture
def event_log() -> Iterator[io.StringIO]:
    """The ``guard.events`` log as Guard writes it (text format)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("guard.events")
    old = logger.handlers[:], logger.propagate, logger.level
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield stream
    logger.handlers[:], logger.propagate = old[0], old[1]
    logger.setLevel(old[2])


@pytest.fixture
async def ledger(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLedger]:
    store = ledger_from_url(redis_url, prefix=key_prefix, timeout=1.0)
    yield store
    await store.close()


async def test_a_writer_that_fails_retries_and_writes_each_event_once() -> None:
    bus = EventBus()
    written: list[Event] = []
    failures = 3

    def flaky(batch: list[Event]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))
        written.extend(batch)

    task = asyncio.create_task(bus.run_audit_writer(flaky, retry_delay=0.01, max_retry_delay=0.05))
    for n in range(5):
        bus.emit(Event(EventKind.REFUSED, "no_rate", call_id=str(n)))
    await wait_for(lambda: len(written) == 5)
    bus.emit(Event(EventKind.REFUSED, "no_rate", call_id="5"))
    await wait_for(lambda: len(written) == 6)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [e.call_id for e in written] == [str(n) for n in range(6)]
    assert bus.pending == 0 and failures == 0


async def test_the_buffer_is_bounded_and_drops_the_oldest() -> None:
    bus = EventBus(buffer_size=3)
    for n in range(5):
        bus.emit(Event(EventKind.REFUSED, "no_rate", call_id=str(n)))
    written: list[Event] = []
    await bus.flush(written.extend)
    assert (bus.dropped, [e.call_id for e in written]) == (2, ["2", "3", "4"])


async def test_events_survive_a_postgresql_outage_and_arrive_once(pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]
    admin = sa.create_engine(pg_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    upgrade(pg_url)
    engine = make_engine(pg_url)
    bus = EventBus()
    task = asyncio.create_task(
        bus.run_audit_writer(audit_writer(engine), retry_delay=0.05, max_retry_delay=0.2)
    )
    try:
        bus.emit(Event(EventKind.REFUSED, "no_rate", call_id="before"))
        await wait_for(lambda: bus.pending == 0)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        for n in range(5):
            bus.emit(Event(EventKind.REFUSED, "no_rate", call_id=f"during-{n}"))
        await asyncio.sleep(0.5)  # the writer fails and retries meanwhile
        assert bus.pending == 5
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        await asyncio.to_thread(upgrade, pg_url)
        await wait_for(lambda: bus.pending == 0)
        rows = _rows(engine)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        engine.dispose()
        admin.dispose()
    assert sorted(call_id for _, _, call_id in rows) == [f"during-{n}" for n in range(5)]


async def test_each_event_appears_once_in_the_log_the_audit_table_and_the_alerts(
    ledger: RedisLedger, sqlite_url: str, event_log: io.StringIO
) -> None:
    upgrade(sqlite_url)
    sql = make_engine(sqlite_url)
    bus = EventBus()
    sent: list[Alert] = []

    class Recorder:
        name = "recorder"

        async def send(self, alert: Alert) -> None:
            sent.append(alert)

        async def close(self) -> None:
            return None

    alerts = AlertDispatcher([Recorder()])
    bus.add_sink(alerts)
    engine = Engine(
        SnapshotHolder(make_snapshot()),
        ledger,
        bus,
        EngineSettings(),
        perimeter=Perimeter(ledger, PerimeterSettings()),
    )
    attempt = make_attempt(source_ip="203.0.113.66", user_agent=HOSTILE_UA + "sipvicious")
    await engine.authorize(attempt)
    await engine.drain()
    await bus.flush(audit_writer(sql))
    await alerts.drain()

    lines = event_log.getvalue().splitlines()
    assert len(lines) == 2  # the refusal and the block, one line each whatever the User-Agent
    found = [re.findall(r" kind=(\w+) reason=(\w+) src=(\S+) ", line) for line in lines]
    assert found == [
        [("refused", "scanner_user_agent", "203.0.113.66")],
        [("ip_blocked", "scanner_user_agent", "203.0.113.66")],
    ]
    rows = _rows(sql)
    assert sorted(rows) == sorted(
        [
            ("ip_blocked", "scanner_user_agent", attempt.call_id),
            ("refused", "scanner_user_agent", attempt.call_id),
        ]
    )
    assert sorted(a.rule for a in sent) == ["ip_blocked", "scanner_seen"]
    audited = list_audit_events(sql, kind="refused")
    assert audited[0].detail["ua"] == HOSTILE_UA + "sipvicious"
    sql.dispose()
