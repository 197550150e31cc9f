"""Migration 0002 and the perimeter's SQL configuration: allow-lists, thresholds, countries,
temporary limit raises (applied by the snapshot, lapsing by themselves) and the audit log."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest
import sqlalchemy as sa
from factories import make_snapshot

from guard.config import repository as repo
from guard.config.db import current_revision, downgrade, head_revision, make_engine, upgrade
from guard.config.loader import build_snapshot
from guard.config.models import LimitRaise
from guard.domain import CountryMode
from guard.engine import SnapshotHolder
from guard.errors import NotFoundError, ValidationError
from guard.snapshot import Snapshot

ADMIN = "alice"


def test_migration_0002_adds_and_removes_its_schema_keeping_data(pg_url: str) -> None:
    upgrade(pg_url, "0001")
    engine = make_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO tenants (name, timezone, currency, fail_mode, international_prefix,"
                " national_prefix, country_code, max_call_seconds, enabled, created_at) VALUES"
                " ('acme', 'UTC', 'EUR', 'deny', '00', '0', '', 3600, true, now())"
            )
        )
    upgrade(pg_url)
    assert current_revision(pg_url) == head_revision()
    info = repo.get_perimeter(engine, "acme")
    assert (info.country_mode, info.countries, info.block_threshold) == (CountryMode.OFF, (), None)
    repo.add_ip_allow(engine, "192.0.2.0/24", actor=ADMIN, tenant="acme")
    downgrade(pg_url, "0001")
    tables = sa.inspect(engine).get_table_names()
    columns = {c["name"] for c in sa.inspect(engine).get_columns("tenants")}
    assert "ip_allow" not in tables and "limit_raises" not in tables
    assert "country_mode" not in columns and "block_threshold" not in columns
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT name FROM tenants")).scalar_one() == "acme"
    upgrade(pg_url)
    engine.dispose()


@pytest.fixture
def store(sqlite_url: str) -> sa.Engine:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    repo.add_tenant(engine, "acme", actor=ADMIN, daily_limit=500_000)
    repo.add_extension(engine, "acme", "1001", actor=ADMIN, daily_limit=50_000)
    return engine


def test_allow_lists_are_global_or_per_tenant_and_audited(store: sa.Engine) -> None:
    repo.add_ip_allow(store, "203.0.113.0/24", actor=ADMIN, note="office")
    repo.add_ip_allow(store, "198.51.100.7", actor=ADMIN, tenant="acme")
    with pytest.raises(ValidationError, match="already"):
        repo.add_ip_allow(store, "203.0.113.0/24", actor=ADMIN)
    with pytest.raises(ValidationError, match="host bits"):
        repo.add_ip_allow(store, "203.0.113.1/24", actor=ADMIN)
    assert [i.cidr for i in repo.list_ip_allow(store)] == ["203.0.113.0/24"]
    assert [i.cidr for i in repo.list_ip_allow(store, tenant="acme")] == ["198.51.100.7/32"]
    snapshot = build_snapshot(store)
    assert snapshot.ip_allow == (ip_network("203.0.113.0/24"),)
    assert snapshot.tenants["acme"].ip_allow == (ip_network("198.51.100.7/32"),)
    repo.remove_ip_allow(store, "203.0.113.0/24", actor=ADMIN)
    with pytest.raises(NotFoundError):
        repo.remove_ip_allow(store, "203.0.113.0/24", actor=ADMIN)
    kinds = [e.kind for e in repo.list_audit_events(store, kind="admin.ip_allow.*")]
    assert kinds == ["admin.ip_allow.remove", "admin.ip_allow.add", "admin.ip_allow.add"]


def test_block_thresholds_and_country_lists_reach_the_snapshot(store: sa.Engine) -> None:
    repo.set_block_policy(store, "acme", actor=ADMIN, threshold=5, seconds=600)
    repo.set_countries(store, "acme", "allow", "gb, fr", actor=ADMIN)
    repo.set_countries(store, "acme", "deny", ["FR"], actor=ADMIN, extension="1001")
    for mode, countries in (("deny", ""), ("off", "GB"), ("allow", "GBR"), ("allow", "G\n")):
        with pytest.raises(ValidationError):
            repo.set_countries(store, "acme", mode, countries, actor=ADMIN)
    snapshot = build_snapshot(store)
    tenant, ext = snapshot.tenants["acme"], snapshot.extensions["acme", "1001"]
    assert (tenant.block_threshold, tenant.block_seconds) == (5, 600)
    assert (tenant.country_mode, tenant.countries) == (CountryMode.ALLOW, {"GB", "FR"})
    assert (ext.country_mode, ext.countries) == (CountryMode.DENY, {"FR"})
    repo.set_block_policy(store, "acme", actor=ADMIN, threshold=None)
    assert build_snapshot(store).tenants["acme"].block_threshold is None


def test_a_limit_raise_applies_until_it_expires(store: sa.Engine) -> None:
    before = time.time()
    raised = repo.add_limit_raise(store, "acme", 80_000, 3600, actor=ADMIN, extension="1001")
    repo.add_limit_raise(store, "acme", 900_000, 7200, actor=ADMIN, reason="campaign")
    snapshot = build_snapshot(store)
    assert snapshot.extensions["acme", "1001"].daily_limit == 80_000
    assert snapshot.tenants["acme"].daily_limit == 900_000
    assert snapshot.expires_at == pytest.approx(before + 3600, abs=5)
    assert raised.expires_at > datetime.now(UTC)
    assert [r.extension for r in repo.list_limit_raises(store, tenant="acme")] == ["1001", None]
    # An ended raise no longer applies.
    with store.begin() as connection:
        connection.execute(
            sa.update(LimitRaise)
            .where(LimitRaise.id == raised.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    after = build_snapshot(store)
    assert after.extensions["acme", "1001"].daily_limit == 50_000
    assert repo.list_limit_raises(store, tenant="acme", include_expired=True)[0].id == raised.id
    repo.cancel_limit_raise(store, raised.id + 1, actor=ADMIN)
    assert build_snapshot(store).tenants["acme"].daily_limit == 500_000
    assert build_snapshot(store).expires_at is None
    kinds = {e.kind for e in repo.list_audit_events(store, kind="admin.limit.")}
    assert kinds == {"admin.limit.raise", "admin.limit.cancel"}


def test_only_a_real_raise_is_accepted(store: sa.Engine) -> None:
    repo.add_extension(store, "acme", "1002", actor=ADMIN)
    with pytest.raises(ValidationError, match="no daily limit"):
        repo.add_limit_raise(store, "acme", 80_000, 3600, actor=ADMIN, extension="1002")
    with pytest.raises(ValidationError, match="not above"):
        repo.add_limit_raise(store, "acme", 50_000, 3600, actor=ADMIN, extension="1001")
    with pytest.raises(ValidationError, match="seconds"):
        repo.add_limit_raise(store, "acme", 60_000, 40 * 86_400, actor=ADMIN, extension="1001")


async def test_the_holder_rebuilds_when_a_raise_ends() -> None:
    now = [1000.0]
    raised = replace(make_snapshot(version=3), expires_at=1010.0)
    holder = SnapshotHolder(raised, clock=lambda: now[0])
    rebuilt = replace(make_snapshot(version=3), expires_at=None)

    async def version() -> int:
        return 3

    def build() -> Snapshot:
        return rebuilt

    assert not await holder.reload_if_changed(build, version)
    now[0] = 1010.0
    assert await holder.reload_if_changed(build, version)
    assert holder.current is rebuilt
    assert not await holder.reload_if_changed(build, version)


def test_audit_events_are_filtered_and_newest_first(store: sa.Engine) -> None:
    repo.record_admin_event(store, ADMIN, "ip.block", {"ip": "192.0.2.1"})
    events = repo.list_audit_events(store, limit=2)
    assert [e.kind for e in events] == ["admin.ip.block", "admin.extension.add"]
    assert events[0].actor == ADMIN and events[0].detail == {"ip": "192.0.2.1"}
    assert repo.list_audit_events(store, tenant="acme", kind="admin.tenant.add")[0].tenant == "acme"
    future = datetime.now(UTC) + timedelta(hours=1)
    assert repo.list_audit_events(store, since=future) == []
    assert repo.list_audit_events(store, kind="admin_%") == []  # LIKE characters are literal
