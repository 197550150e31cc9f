"""Alembic migrations and engines of the SQL configuration store, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from guard.config import db, repository
from guard.config.models import Base
from guard.errors import ConfigStoreError, ConfigurationError


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


def _constraint_names(tables: dict[str, Any]) -> dict[str, set[str]]:
    return {name: set(found) for name, found in tables.items()}


def _model_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for table in Base.metadata.sorted_tables:
        found = {str(table.primary_key.name)}
        found |= {str(c.name) for c in table.constraints if isinstance(c, sa.UniqueConstraint)}
        found |= {str(fk.name) for fk in table.foreign_key_constraints}
        found |= {str(ix.name) for ix in table.indexes}
        names[table.name] = found
    return names


def _reflected_names(engine: sa.Engine) -> dict[str, set[str]]:
    inspector = sa.inspect(engine)
    names: dict[str, set[str]] = {}
    for table in inspector.get_table_names():
        if table == "alembic_version":
            continue
        found = {str(inspector.get_pk_constraint(table)["name"])}
        found |= {str(u["name"]) for u in inspector.get_unique_constraints(table)}
        found |= {str(fk["name"]) for fk in inspector.get_foreign_keys(table)}
        # PostgreSQL reports the index behind each unique constraint as an index too.
        found |= {
            str(ix["name"])
            for ix in inspector.get_indexes(table)
            if not ix.get("duplicates_constraint")
        }
        names[table] = found
    return names


def test_upgrade_creates_exactly_the_model_schema(store_url: str) -> None:
    assert db.current_revision(store_url) is None
    db.upgrade(store_url)
    assert db.current_revision(store_url) == db.head_revision() is not None
    engine = db.make_engine(store_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        assert _reflected_names(engine) == _model_names()
        assert repository.read_version(engine) == 0
    finally:
        engine.dispose()


def test_downgrade_to_base_drops_every_table_and_can_upgrade_again(store_url: str) -> None:
    db.upgrade(store_url)
    db.downgrade(store_url, "base")
    assert db.current_revision(store_url) is None
    engine = db.make_engine(store_url)
    try:
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    db.upgrade(store_url)
    assert db.current_revision(store_url) == db.head_revision()


def test_every_revision_steps_down_and_up_keeping_data(store_url: str) -> None:
    """One revision at a time, with a tenant and its extension present: SQLite batch rebuilds
    must neither fail on foreign keys nor cascade-delete the children."""
    db.upgrade(store_url)
    engine = db.make_engine(store_url)
    try:
        repository.add_tenant(engine, "acme", actor="t")
        repository.add_extension(engine, "acme", "100", actor="t", profile="international")
    finally:
        engine.dispose()
    seen = [db.current_revision(store_url)]
    while seen[-1] != "0001":
        db.downgrade(store_url, "-1")
        seen.append(db.current_revision(store_url))
    while seen[-1] != db.head_revision():
        db.upgrade(store_url, "+1")
        seen.append(db.current_revision(store_url))
    assert seen[0] == seen[-1] == db.head_revision()
    engine = db.make_engine(store_url)
    try:
        extension = repository.get_extension(engine, "acme", "100")
        assert extension.profile == "international"
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_at_head(store_url: str) -> None:
    db.upgrade(store_url)
    db.upgrade(store_url)
    assert db.current_revision(store_url) == db.head_revision()


def test_unknown_revision_is_a_configuration_error(sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot upgrade to 'nope'"):
        db.upgrade(sqlite_url, "nope")


def test_missing_migrations_folder_is_named(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "MIGRATIONS_DIR", tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match="nowhere"):
        db.upgrade(sqlite_url)


def test_sqlite_engine_enforces_foreign_keys_and_uses_wal(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        extensions = Base.metadata.tables["extensions"]
        with (
            pytest.raises(ConfigStoreError, match="refused the write"),
            db.session_scope(engine) as session,
        ):
            session.execute(sa.insert(extensions).values(tenant_id=999, name="100"))
    finally:
        engine.dispose()


def test_in_memory_sqlite_works_without_wal() -> None:
    engine = db.make_engine("sqlite://")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "memory"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_bare_postgresql_url_uses_psycopg2() -> None:
    engine = db.make_engine("postgresql://guard@127.0.0.1/guard")
    assert engine.dialect.driver == "psycopg2"
    assert engine.pool._pre_ping  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://guard:s3cret@db:5432/guard", "postgresql://guard:***@db:5432/guard"),
        ("postgresql://guard@db/guard?password=s3cret", "postgresql://guard@db/guard?password=***"),
        ("sqlite:////var/lib/guard/guard.db", "sqlite:////var/lib/guard/guard.db"),
        ("weird://user:s3cret@host/x y", "weird://user:***@host/x y"),
    ],
)
def test_mask_url_hides_passwords(url: str, shown: str) -> None:
    assert db.mask_url(url) == shown


def test_unreachable_store_names_the_masked_url() -> None:
    url = "postgresql://guard:s3cret@127.0.0.1:1/guard"
    with pytest.raises(ConfigStoreError) as caught:
        db.upgrade(url)
    message = str(caught.value)
    assert "s3cret" not in message
    assert "postgresql+psycopg2://guard:***@127.0.0.1:1/guard" in message
    assert "unreachable" in message


def test_store_without_schema_says_to_migrate(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url)
    try:
        with pytest.raises(ConfigStoreError, match="run the migrations"):
            repository.list_tenants(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (
            "mysql://guard:s3cret@db/guard",
            "unsupported config store URL 'mysql://guard:***@db/guard'",
        ),
        ("not a url", "invalid config store URL"),
    ],
)
def test_unusable_urls_are_configuration_errors(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        db.make_engine(url)
    assert words in str(caught.value)
    assert "s3cret" not in str(caught.value)
