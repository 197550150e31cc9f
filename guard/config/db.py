"""Engines, sessions and Alembic migrations of the SQL configuration store.

One place decides how Guard talks to SQL: SQLite (foreign keys on, WAL, explicit transactions so
that reads are repeatable and writers queue instead of failing) or PostgreSQL (pre-ping, short
connect timeout). Every database failure leaves here as ``ConfigStoreError`` naming the store by
``mask_url``: no password is ever part of a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session

import guard
from guard.errors import ConfigStoreError, ConfigurationError

if TYPE_CHECKING:
    # Alembic is slow to import and only migrations and revision reads need it (`guard db`,
    # `guard doctor`): the functions below import it, not `guard serve` or the other commands.
    from alembic.config import Config

#: Where the Alembic environment lives: top-level ``migrations/`` of the source tree.
MIGRATIONS_DIR = Path(guard.__file__).resolve().parent.parent / "migrations"
#: Seconds to wait for a PostgreSQL connection or a SQLite write lock.
CONNECT_TIMEOUT_SECONDS = 5

_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword"})
#: Execution option read by the SQLite ``begin`` hook: ``IMMEDIATE`` for write transactions.
_SQLITE_BEGIN = "guard_sqlite_begin"


def mask_url(url: str | URL) -> str:
    """``url`` with its password (userinfo or query parameter) replaced by ``***``."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", str(url))
    secret_keys = [key for key in parsed.query if key.lower() in _SECRET_QUERY_KEYS]
    if secret_keys:
        parsed = parsed.update_query_dict(dict.fromkeys(secret_keys, "***"))
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError(
            f"invalid config store URL {mask_url(url)!r}: expected sqlite:///path or "
            "postgresql://user:password@host/database"
        ) from None


def _scrub(text: str, url: URL) -> str:
    """``text`` without the URL's password, should a driver ever echo it."""
    secrets = [url.password, *(url.query[k] for k in url.query if k.lower() in _SECRET_QUERY_KEYS)]
    for secret in secrets:
        if isinstance(secret, str) and secret:
            text = text.replace(secret, "***")
    return text


def make_engine(url: str | URL) -> Engine:
    """An engine for the configuration store at ``url`` (SQLite or PostgreSQL only)."""
    return _create_engine(url, foreign_keys=True)


def _create_engine(url: str | URL, *, foreign_keys: bool) -> Engine:
    """``make_engine``; migrations pass ``foreign_keys=False`` so that SQLite batch table
    rebuilds never cascade deletes (a ``DROP TABLE`` under enforced keys deletes children)."""
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            engine = sa.create_engine(parsed, connect_args={"timeout": CONNECT_TIMEOUT_SECONDS})
            _configure_sqlite(engine, foreign_keys=foreign_keys)
        elif backend == "postgresql":
            if parsed.drivername == "postgresql":
                # SQLAlchemy 2.1 defaults to psycopg 3; Guard ships psycopg2.
                parsed = parsed.set(drivername="postgresql+psycopg2")
            engine = sa.create_engine(
                parsed,
                pool_pre_ping=True,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
            )
        else:
            raise ConfigurationError(
                f"unsupported config store URL {mask_url(parsed)!r}: "
                "use sqlite:///path or postgresql://…"
            )
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigurationError(
            f"cannot use config store URL {mask_url(parsed)!r}: {_scrub(str(exc), parsed)}"
        ) from None
    return engine


def _configure_sqlite(engine: Engine, *, foreign_keys: bool) -> None:
    """Foreign keys, WAL for files, and SQLAlchemy-driven BEGIN (``sqlite3``'s legacy mode
    runs SELECTs outside any transaction, which would make a snapshot build inconsistent)."""
    file_based = _is_sqlite_file(engine.url)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        if file_based:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _is_sqlite_file(url: URL) -> bool:
    return bool(url.database) and url.database != ":memory:" and url.query.get("mode") != "memory"


@contextmanager
def store_errors(engine: Engine) -> Iterator[None]:
    """Translate SQLAlchemy/driver errors into ``ConfigStoreError`` naming the masked URL."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        raise ConfigStoreError(_describe(exc, engine.url)) from None
    except sa.exc.SQLAlchemyError as exc:
        raise ConfigStoreError(
            f"config store {mask_url(engine.url)}: {_scrub(str(exc), engine.url)}"
        ) from None


def _describe(exc: sa.exc.DBAPIError, url: URL) -> str:
    detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc).__name__
    detail = _scrub(detail, url)
    where = f"config store {mask_url(url)}"
    if isinstance(exc, sa.exc.IntegrityError):
        return f"{where} refused the write: {detail}"
    if "no such table" in detail or ("relation" in detail and "does not exist" in detail):
        return f"{where} has no Guard schema ({detail}): run the migrations (guard db upgrade)"
    if exc.connection_invalidated or isinstance(
        exc, sa.exc.OperationalError | sa.exc.InterfaceError
    ):
        return f"{where} is unreachable or failed: {detail}"
    return f"{where} failed: {detail}"


@contextmanager
def session_scope(engine: Engine, *, write: bool = True) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, errors as ``ConfigStoreError``.

    ``write`` transactions take SQLite's write lock up front (``BEGIN IMMEDIATE``) so that two
    admins writing at once queue for up to ``CONNECT_TIMEOUT_SECONDS`` instead of one failing.
    Objects stay readable after commit (``expire_on_commit=False``) but must not leave the scope.
    """
    bind = engine.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE" if write else "DEFERRED"})
    with (
        store_errors(engine),
        Session(bind=bind, expire_on_commit=False) as session,
        session.begin(),
    ):
        yield session


def _alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration in code (no ``alembic.ini``); never holds the URL."""
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ConfigurationError(
            f"Alembic migrations not found at {MIGRATIONS_DIR}: Guard must run from a source "
            "tree or an install that keeps migrations/ beside the guard package"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _migrate(url: str | URL, action: str, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    engine = _create_engine(url, foreign_keys=False)
    try:
        with store_errors(engine), engine.connect() as raw:
            connection = raw.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
            with connection.begin():
                config = _alembic_config(connection)
                try:
                    if action == "upgrade":
                        command.upgrade(config, revision)
                    else:
                        command.downgrade(config, revision)
                except CommandError as exc:
                    raise ConfigurationError(f"cannot {action} to {revision!r}: {exc}") from None
                if engine.dialect.name == "sqlite":
                    _check_foreign_keys(connection)
    finally:
        engine.dispose()


def _check_foreign_keys(connection: sa.Connection) -> None:
    """Refuse to commit a SQLite migration that left dangling references behind."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise ConfigurationError(f"migration left broken foreign keys in {', '.join(tables)}")


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the store at ``url`` up to ``revision``, in one transaction."""
    _migrate(url, "upgrade", revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the store at ``url`` down to ``revision`` (``"base"`` drops every table)."""
    _migrate(url, "downgrade", revision)


def current_revision(url: str | URL) -> str | None:
    """The revision the store at ``url`` is at, or ``None`` before the first migration."""
    from alembic.runtime.migration import MigrationContext

    engine = _create_engine(url, foreign_keys=True)
    try:
        with store_errors(engine), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped in ``migrations/``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()
