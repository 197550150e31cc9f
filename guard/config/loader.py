"""Builds the immutable ``Snapshot`` the hot path reads, from the SQL configuration store.

Everything is read in one read-only transaction, so the snapshot is one consistent view at one
version. Statements are Core selects of columns, run on the driver's own cursor so that rows
arrive as plain tuples (streamed for the big tables); rates are built a column at a time and
repeated values are shared, so that 100k extensions and a 1M-row deck build in a few seconds.
Given the snapshot serving until now, a rate deck that has not changed since is taken over
instead of read again. Never writes; on failure it raises ``ConfigStoreError`` and the caller
keeps serving its previous snapshot.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from ipaddress import ip_network
from operator import itemgetter
from types import MappingProxyType
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.config.db import store_errors
from guard.config.models import Base
from guard.config.repository import DEFAULT_PROFILE, DEFAULT_PROFILES, GLOBAL_DECK, VERSION_KEY
from guard.domain import CountryMode, DestinationClass, FailMode, ReservationMode, UaLockMode
from guard.snapshot import (
    DEFAULT_EMERGENCY_NUMBERS,
    DEFAULT_SCANNER_PATTERNS,
    DestinationRule,
    ExtensionConfig,
    IPNetwork,
    PrefixTable,
    Snapshot,
    StoredRate,
    TenantConfig,
    WeeklyWindow,
)

_TABLES = Base.metadata.tables
#: Rows fetched per round trip (through a server-side cursor on PostgreSQL).
_STREAM_ROWS = 20_000
#: Rows handed over at a time. The rates are built by C-level passes over them that hold the GIL
#: throughout: a few milliseconds at most, so that the event loop serving calls while a
#: reload builds in its thread is never held up for longer.
_BATCH_ROWS = 2_000
_CLASSES = {member.value: member for member in DestinationClass}
_UA_MODES = {member.value: member for member in UaLockMode}
_FAIL_MODES = {member.value: member for member in FailMode}
_COUNTRY_MODES = {member.value: member for member in CountryMode}
_RESERVATION_MODES = {member.value: member for member in ReservationMode}
#: Destination class value → the same string, held by the enum (shared, and validated).
_CLASS_VALUES = {member.value: member.value for member in DestinationClass}

#: (tenant id, extension id or None) → items of that scope.
_Scoped = dict[tuple[int, int | None], list[Any]]
_Networks = dict[tuple[int, int | None], tuple[IPNetwork, ...]]
_Windows = dict[tuple[int, int | None], tuple[WeeklyWindow, ...]]
_Row = tuple[Any, ...]
_T = TypeVar("_T")
_K = TypeVar("_K")


def _slot_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A constructor of the frozen, slotted dataclass ``cls`` that fills the slots directly.

    A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``, which
    makes it twice as slow as this (3.1 against 1.6 µs for an ``ExtensionConfig``, times 100k
    extensions). It builds the same object; it takes every field by keyword and none has a
    default, so a field added to ``cls`` fails the build loudly instead of silently taking its
    default. Refused for a class that validates in ``__post_init__``: those checks must not be
    skipped.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in vars(cls):
        raise TypeError(f"{cls.__name__} is not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} validates in __post_init__: build it with its __init__")
    names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{name}": vars(cls)[name].__set__ for name in names})
    source = "".join(
        [
            f"def new_{cls.__name__}(*, {', '.join(names)}):\n",
            "    self = _new(_cls)\n",
            *(f"    _set_{name}(self, {name})\n" for name in names),
            "    return self\n",
        ]
    )
    exec(source, namespace)  # noqa: S102 - generated from the dataclass's own field names
    constructor: Callable[..., _T] = namespace[f"new_{cls.__name__}"]
    return constructor


_new_tenant = _slot_constructor(TenantConfig)
_new_extension = _slot_constructor(ExtensionConfig)


def build_snapshot(engine: Engine, previous: Snapshot | None = None) -> Snapshot:
    """Read the whole configuration into a new ``Snapshot``.

    ``previous``, the snapshot serving until now, lends the new one its rate decks that did not
    change: a deck whose stamp (``RateDeck.stamp``, new at every import) is the same as when
    ``previous`` read it is not read again, and both snapshots share its table.
    """
    started = time.perf_counter()
    with _gc_paused(), store_errors(engine), engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        with connection.begin():
            snapshot = _Builder(connection, previous).build()
    return dataclasses.replace(
        snapshot, built_at=time.time(), build_seconds=time.perf_counter() - started
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector while building, then file what the build made as old.

    The build allocates millions of acyclic objects: the collections they would trigger would
    rescan all of them, doubling the build time. When the collector comes back on, the young
    generation holds every object of the new snapshot, and the first allocation would trigger a
    collection that walks them all (a third of a second for a 1M-row deck), and later another
    one when they move on from the middle generation. A snapshot lives until the next reload, so
    on success its objects are moved straight to the oldest generation instead (``freeze`` then
    ``unfreeze``: no scan), like any long-lived data; young garbage cycles of the process that
    moved with them are collected at the next full collection. Skipped when the process froze
    objects itself (``unfreeze`` would release them).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if enabled and gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
    finally:
        if enabled:
            gc.enable()


class _Builder:
    """Reads one table after the other on ``connection`` and assembles the snapshot."""

    def __init__(self, connection: sa.Connection, previous: Snapshot | None = None) -> None:
        self.connection = connection
        #: Rate tables of the previous snapshot by source, ``(deck id, stamp)``.
        self.reusable: dict[tuple[int, str], PrefixTable] = {}
        if previous is not None:
            for table in (previous.global_rates, *previous.tenant_rates.values()):
                if table.source is not None:
                    self.reusable[table.source] = table
        dialect = connection.dialect
        #: psycopg (2 and 3) opens a server-side cursor when given a name: PostgreSQL then
        #: streams the rows instead of sending all of them at once.
        self.server_side = dialect.name == "postgresql" and dialect.driver in {
            "psycopg2",
            "psycopg",
        }
        self.cursors = itertools.count()
        self.networks: dict[str, IPNetwork] = {}
        self.country_sets: dict[str, frozenset[str]] = {}
        #: Active temporary limit raises by (tenant id, extension id or None), and the earliest
        #: end among them (epoch seconds).
        self.raises: dict[tuple[int, int | None], int] = {}
        self.expires_at: float | None = None
        #: Networks never blocked, by tenant id (``None``: every tenant).
        self.allowed: dict[int | None, list[str]] = defaultdict(list)

    def partitions(self, statement: sa.Select[Any]) -> Iterator[Sequence[_Row]]:
        """The rows of ``statement``, as lists of at most ``_BATCH_ROWS`` plain tuples.

        SQLAlchemy compiles the statement and owns the transaction, but the driver's own cursor
        runs it: wrapping a million rows in ``Row`` objects would cost as much as building the
        rates. Values therefore come as the driver gives them, without SQLAlchemy's result
        processing: SQLite gives booleans as 0 or 1 (``bool()`` them) and dates as text, so no
        date column may be read here; parameters are written into the SQL (integers only).
        Driver errors are raised as SQLAlchemy's, as ``execute`` would, for ``store_errors`` to
        translate.
        """
        dialect = self.connection.dialect
        compiled = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        sql = str(compiled)
        dbapi_connection = self.connection.connection
        error = dialect.loaded_dbapi.Error
        cursor = None
        try:
            if self.server_side:
                cursor = dbapi_connection.cursor(f"guard_snapshot_{next(self.cursors)}")
            else:
                cursor = dbapi_connection.cursor()
            cursor.execute(sql)
            while rows := cursor.fetchmany(_STREAM_ROWS):
                for start in range(0, len(rows), _BATCH_ROWS):
                    yield rows[start : start + _BATCH_ROWS]
        except error as exc:
            invalidated = dialect.is_disconnect(exc, dbapi_connection, cursor)
            if invalidated:
                self.connection.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                sql, None, exc, error, connection_invalidated=invalidated, dialect=dialect
            ) from exc
        finally:
            if cursor is not None and not self.connection.invalidated:
                with suppress(error):  # a failed transaction refuses to close a named cursor
                    cursor.close()

    def rows(self, *columns: sa.ColumnElement[Any]) -> Iterator[_Row]:
        for partition in self.partitions(sa.select(*columns)):
            yield from partition

    def build(self) -> Snapshot:
        meta = _TABLES["config_meta"].c
        version = self.connection.execute(
            sa.select(meta.value).where(meta.key == VERSION_KEY)
        ).scalar_one_or_none()
        tenant_names = {
            tenant_id: name for tenant_id, name in self.rows(*_TABLES["tenants"].c["id", "name"])
        }
        networks = {
            scope: tuple(map(self.network, cidrs))
            for scope, cidrs in self.scoped("networks", "cidr").items()
        }
        self.read_raises()
        self.read_ip_allow()
        windows = {
            scope: _windows(rows)
            for scope, rows in self.scoped(
                "time_windows", "weekday", "start_minute", "end_minute"
            ).items()
        }
        global_rules, tenant_rules = self.rules()
        global_rates, tenant_rates = self.rates(tenant_names)
        return Snapshot(
            version=int(version or 0),
            tenants=MappingProxyType(self.tenants(tenant_rules, networks, windows)),
            extensions=MappingProxyType(self.extensions(tenant_names, networks, windows)),
            global_rates=global_rates,
            tenant_rates=tenant_rates,
            global_rules=global_rules,
            scanner_patterns=self.scanner_patterns(),
            ip_allow=tuple(self.network(cidr) for cidr in self.allowed.get(None, ())),
            expires_at=self.expires_at,
        )

    def scoped(self, table: str, *columns: str) -> _Scoped:
        """Rows of a tenant/extension-scoped table grouped by scope, in id order."""
        found: _Scoped = defaultdict(list)
        c = _TABLES[table].c
        statement_columns = [c.tenant_id, c.extension_id, *(c[name] for name in columns)]
        for row in self.rows(*statement_columns):
            found[row[0], row[1]].append(row[2:] if len(columns) > 1 else row[2])
        return found

    def network(self, cidr: str) -> IPNetwork:
        network = self.networks.get(cidr)
        if network is None:
            network = self.networks[cidr] = ip_network(cidr)
        return network

    def rules(self) -> tuple[tuple[DestinationRule, ...], dict[int, list[DestinationRule]]]:
        c = _TABLES["destination_rules"].c
        shared: list[DestinationRule] = []
        per_tenant: dict[int, list[DestinationRule]] = defaultdict(list)
        for tenant_id, prefix, dest_class, max_rate in self.rows(
            c.tenant_id, c.prefix, c.dest_class, c.max_rate
        ):
            rule = DestinationRule(
                prefix=prefix or None,
                dest_class=_CLASSES[dest_class] if dest_class else None,
                max_rate=max_rate,
            )
            (shared if tenant_id is None else per_tenant[tenant_id]).append(rule)
        return tuple(shared), per_tenant

    def read_raises(self) -> None:
        """The temporary limit raises in force now: the highest one of each scope applies."""
        c = _TABLES["limit_raises"].c
        now = datetime.now(UTC)
        statement = sa.select(c.tenant_id, c.extension_id, c.daily_limit, c.expires_at).where(
            c.expires_at > now
        )
        for tenant_id, extension_id, limit, expires_at in self.connection.execute(statement):
            scope = (tenant_id, extension_id)
            self.raises[scope] = max(limit, self.raises.get(scope, limit))
            ends = _epoch(expires_at)
            self.expires_at = ends if self.expires_at is None else min(self.expires_at, ends)

    def raised(self, scope: tuple[int, int | None], limit: int | None) -> int | None:
        """``limit`` after the raise of ``scope``, if any (a raise never lowers a limit, and
        "no limit" stays so)."""
        raised = self.raises.get(scope)
        return limit if raised is None or limit is None else max(limit, raised)

    def read_ip_allow(self) -> None:
        c = _TABLES["ip_allow"].c
        for tenant_id, cidr in self.rows(c.tenant_id, c.cidr):
            self.allowed[tenant_id].append(cidr)

    def countries(self, text: str) -> frozenset[str]:
        found = self.country_sets.get(text)
        if found is None:
            found = self.country_sets[text] = frozenset(item for item in text.split(",") if item)
        return found

    def tenants(
        self, rules: dict[int, list[DestinationRule]], networks: _Networks, windows: _Windows
    ) -> dict[str, TenantConfig]:
        emergency: dict[int | None, set[str]] = defaultdict(set)
        numbers = _TABLES["emergency_numbers"].c
        for tenant_id, number in self.rows(numbers.tenant_id, numbers.number):
            emergency[tenant_id].add(number)
        shared_emergency = DEFAULT_EMERGENCY_NUMBERS | emergency.pop(None, set())
        c = _TABLES["tenants"].c
        tenants: dict[str, TenantConfig] = {}
        for row in self.rows(
            c.id,
            c.name,
            c.timezone,
            c.currency,
            c.daily_limit,
            c.concurrent_limit,
            c.fail_mode,
            c.international_prefix,
            c.national_prefix,
            c.country_code,
            c.max_call_seconds,
            c.enabled,
            c.block_threshold,
            c.block_seconds,
            c.country_mode,
            c.countries,
            c.reservation_mode,
            c.slice_seconds,
            c.shadow,
            c.shadow_enforce_perimeter,
        ):
            tenant_id, name = row[0], row[1]
            extra = emergency.get(tenant_id)
            allowed = self.allowed.get(tenant_id)
            tenants[name] = _new_tenant(
                name=name,
                timezone=row[2],
                currency=row[3],
                daily_limit=self.raised((tenant_id, None), row[4]),
                concurrent_limit=row[5],
                fail_mode=_FAIL_MODES[row[6]],
                international_prefix=row[7],
                national_prefix=row[8],
                country_code=row[9],
                max_call_seconds=row[10],
                networks=networks.get((tenant_id, None), ()),
                windows=windows.get((tenant_id, None), ()),
                rules=tuple(rules.get(tenant_id, ())),
                emergency_numbers=shared_emergency | extra if extra else shared_emergency,
                enabled=bool(row[11]),
                block_threshold=row[12],
                block_seconds=row[13],
                ip_allow=tuple(map(self.network, allowed)) if allowed else (),
                country_mode=_COUNTRY_MODES[row[14]],
                countries=self.countries(row[15]),
                reservation_mode=_RESERVATION_MODES[row[16]],
                slice_seconds=row[17],
                shadow=bool(row[18]),
                shadow_enforce_perimeter=bool(row[19]),
            )
        return tenants

    def extensions(
        self, tenant_names: dict[int, str], networks: _Networks, windows: _Windows
    ) -> dict[tuple[str, str], ExtensionConfig]:
        class_sets: dict[str, frozenset[DestinationClass]] = {}
        profiles: dict[int, tuple[str, frozenset[DestinationClass]]] = {}
        named: dict[tuple[int | None, str], tuple[str, frozenset[DestinationClass]]] = {}
        p = _TABLES["routing_profiles"].c
        for profile_id, tenant_id, name, classes in self.rows(p.id, p.tenant_id, p.name, p.classes):
            allowed = class_sets.get(classes)
            if allowed is None:
                allowed = class_sets[classes] = frozenset(
                    _CLASSES[item] for item in classes.split(",") if item
                )
            profiles[profile_id] = named[tenant_id, name] = (name, allowed)
        fallback = named.get(
            (None, DEFAULT_PROFILE), (DEFAULT_PROFILE, frozenset(DEFAULT_PROFILES[DEFAULT_PROFILE]))
        )
        raises, raised, countries = self.raises, self.raised, self.countries
        c = _TABLES["extensions"].c
        extensions: dict[tuple[str, str], ExtensionConfig] = {}
        for (
            extension_id,
            tenant_id,
            name,
            profile_id,
            daily_limit,
            concurrent_limit,
            ua_mode,
            ua_value,
            locked,
            lock_reason,
            country_mode,
            country_list,
            shadow,
        ) in self.rows(
            c.id,
            c.tenant_id,
            c.name,
            c.profile_id,
            c.daily_limit,
            c.concurrent_limit,
            c.ua_mode,
            c.ua_value,
            c.locked,
            c.lock_reason,
            c.country_mode,
            c.countries,
            c.shadow,
        ):
            tenant = tenant_names[tenant_id]
            profile, allowed = (
                profiles[profile_id]
                if profile_id is not None
                else named.get((tenant_id, DEFAULT_PROFILE), fallback)
            )
            scope = (tenant_id, extension_id)
            extensions[tenant, name] = _new_extension(
                tenant=tenant,
                name=name,
                profile=profile,
                allowed_classes=allowed,
                daily_limit=raised(scope, daily_limit) if raises else daily_limit,
                concurrent_limit=concurrent_limit,
                ua_mode=_UA_MODES[ua_mode],
                ua_value=ua_value,
                locked=bool(locked),
                lock_reason=lock_reason or "",
                networks=networks.get(scope, ()),
                windows=windows.get(scope, ()),
                country_mode=_COUNTRY_MODES[country_mode],
                countries=countries(country_list),
                shadow=bool(shadow),
            )
        return extensions

    def scanner_patterns(self) -> tuple[str, ...]:
        c = _TABLES["scanner_patterns"].c
        extra = sorted({pattern.lower() for (pattern,) in self.rows(c.pattern)})
        return DEFAULT_SCANNER_PATTERNS + tuple(
            p for p in extra if p not in DEFAULT_SCANNER_PATTERNS
        )

    def rates(self, tenant_names: dict[int, str]) -> tuple[PrefixTable, Mapping[str, PrefixTable]]:
        """The global deck and the tenants' own decks; the hot loop of the whole build.

        A deck the previous snapshot read with the same stamp is taken over as it is. The
        others are read, and each of their rows becomes a ``StoredRate`` through ``map`` and
        ``zip`` over the batch's columns, so no bytecode runs per row; ``PrefixTable`` makes the
        ``Rate`` of a row when a lookup first finds it. Names and amounts repeat a lot in real
        decks and are shared, not copied; an unknown destination class fails the build here,
        not a call later.
        """
        d = _TABLES["rate_decks"].c
        owners: dict[int, str | None] = {}
        tables: dict[int, PrefixTable] = {}
        stamps: dict[int, str] = {}
        for deck_id, tenant_id, name, stamp in self.rows(d.id, d.tenant_id, d.name, d.stamp):
            if tenant_id is not None:
                owners[deck_id] = tenant_names[tenant_id]
            elif name == GLOBAL_DECK:
                owners[deck_id] = None
            else:
                continue
            if stamp is not None:
                stamps[deck_id] = stamp
                reused = self.reusable.get((deck_id, stamp))
                if reused is not None:
                    tables[deck_id] = reused
        unread = [deck_id for deck_id in owners if deck_id not in tables]
        if unread:
            everything = len(unread) == len(owners)
            tables.update(self.read_decks(unread, read_all=everything, stamps=stamps))
        global_rates = PrefixTable()
        tenant_rates: dict[str, PrefixTable] = {}
        for deck_id, owner in owners.items():
            table = tables[deck_id]
            if owner is None:
                global_rates = table
            elif table:
                tenant_rates[owner] = table
        return global_rates, MappingProxyType(tenant_rates)

    def read_decks(
        self, deck_ids: list[int], *, read_all: bool, stamps: dict[int, str]
    ) -> dict[int, PrefixTable]:
        """The tables of ``deck_ids`` (every deck there is when ``read_all``), read from SQL."""
        decks: dict[int, dict[str, StoredRate]] = {deck_id: {} for deck_id in deck_ids}
        longest = dict.fromkeys(deck_ids, 0)
        names: _Shared[str] = _Shared()
        amounts: _Shared[int] = _Shared()
        name_of, amount_of = names.__getitem__, amounts.__getitem__
        class_of = _CLASS_VALUES.__getitem__
        deck_id_of, prefix_of, name, dest_class, per_minute, fee, initial, subsequent = map(
            itemgetter, range(8)
        )
        r = _TABLES["rates"].c
        statement = sa.select(
            r.deck_id,
            r.prefix,
            r.name,
            r.dest_class,
            r.rate_per_minute,
            r.connect_fee,
            r.initial_increment,
            r.subsequent_increment,
        )
        if not read_all:
            statement = statement.where(r.deck_id.in_(deck_ids))
        for rows in self.partitions(statement):
            prefixes = list(map(prefix_of, rows))
            rate_rows = zip(
                map(name_of, map(name, rows)),
                map(class_of, map(dest_class, rows)),
                map(amount_of, map(per_minute, rows)),
                map(amount_of, map(fee, rows)),
                map(initial, rows),
                map(subsequent, rows),
                strict=True,
            )
            deck_ids_of_rows = list(map(deck_id_of, rows))
            first = deck_ids_of_rows[0]
            if deck_ids_of_rows.count(first) == len(deck_ids_of_rows):
                if first in decks:
                    decks[first].update(zip(prefixes, rate_rows, strict=True))
                    longest[first] = max(longest[first], max(map(len, prefixes)))
            else:  # rows of several decks: the rare batch where one deck's rows end
                for deck_id, prefix, rate_row in zip(
                    deck_ids_of_rows, prefixes, rate_rows, strict=True
                ):
                    if deck_id in decks:
                        decks[deck_id][prefix] = rate_row
                        longest[deck_id] = max(longest[deck_id], len(prefix))
        return {
            deck_id: PrefixTable.from_rows(
                rows,
                longest[deck_id],
                (deck_id, stamps[deck_id]) if deck_id in stamps else None,
            )
            for deck_id, rows in decks.items()
        }


class _Shared(dict[_K, _K]):
    """Shares equal values: ``shared[value]`` is the first equal value seen (one C-level dict
    lookup when known, so it can be ``map``-ped over a column)."""

    def __missing__(self, value: _K) -> _K:
        self[value] = value
        return value


def _epoch(moment: datetime) -> float:
    """Epoch seconds of a stored time (SQLite hands back naive datetimes, written as UTC)."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def _windows(rows: Iterable[tuple[int, int, int]]) -> tuple[WeeklyWindow, ...]:
    return tuple(WeeklyWindow(weekday, start, end) for weekday, start, end in sorted(rows))
