"""Builds the immutable ``Snapshot`` the hot path reads, from the SQL configuration store.

Everything is read in one read-only transaction, so the snapshot is one consistent view at one
version. Rows come from Core selects as plain tuples (streamed for the big tables) and repeated
values are shared, so that 100k extensions and a 1M-row deck build in seconds. Never writes; on
failure it raises ``ConfigStoreError`` and the caller keeps serving its previous snapshot.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from ipaddress import ip_network
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.config.db import store_errors
from guard.config.models import Base
from guard.config.repository import DEFAULT_PROFILE, DEFAULT_PROFILES, GLOBAL_DECK, VERSION_KEY
from guard.domain import CountryMode, DestinationClass, FailMode, Rate, ReservationMode, UaLockMode
from guard.snapshot import (
    DEFAULT_EMERGENCY_NUMBERS,
    DEFAULT_SCANNER_PATTERNS,
    DestinationRule,
    ExtensionConfig,
    IPNetwork,
    PrefixTable,
    Snapshot,
    TenantConfig,
    WeeklyWindow,
)

_TABLES = Base.metadata.tables
#: Rows fetched per round trip when streaming (server-side cursor on PostgreSQL).
_STREAM_ROWS = 20_000
_CLASSES = {member.value: member for member in DestinationClass}
_UA_MODES = {member.value: member for member in UaLockMode}
_FAIL_MODES = {member.value: member for member in FailMode}
_COUNTRY_MODES = {member.value: member for member in CountryMode}

#: (tenant id, extension id or None) → items of that scope.
_Scoped = dict[tuple[int, int | None], list[Any]]
_Networks = dict[tuple[int, int | None], tuple[IPNetwork, ...]]
_Windows = dict[tuple[int, int | None], tuple[WeeklyWindow, ...]]

#: ``Rate`` is a frozen dataclass whose ``__init__`` sets every field through
#: ``object.__setattr__``: for a 1M-row deck that is the biggest single cost of the build. The
#: rates loop fills the slots through their descriptors instead (the same object, built in less
#: than half the time); this check makes any change to ``Rate``'s fields fail here, loudly.
_RATE_FIELDS = (
    "prefix",
    "name",
    "dest_class",
    "rate_per_minute",
    "connect_fee",
    "initial_increment",
    "subsequent_increment",
)
if tuple(f.name for f in dataclasses.fields(Rate)) != _RATE_FIELDS:
    raise ImportError("guard.domain.Rate changed: update the rates loop of guard.config.loader")


def build_snapshot(engine: Engine) -> Snapshot:
    """Read the whole configuration into a new ``Snapshot``."""
    started = time.perf_counter()
    with _gc_paused(), store_errors(engine), engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        with connection.begin():
            snapshot = _Builder(connection).build()
    return dataclasses.replace(
        snapshot, built_at=time.time(), build_seconds=time.perf_counter() - started
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector: the build allocates millions of acyclic objects, and the full
    collections they trigger would rescan all of them, doubling the build time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Builder:
    """Reads one table after the other on ``connection`` and assembles the snapshot."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection
        self.networks: dict[str, IPNetwork] = {}
        self.country_sets: dict[str, frozenset[str]] = {}
        #: Active temporary limit raises by (tenant id, extension id or None), and the earliest
        #: end among them (epoch seconds).
        self.raises: dict[tuple[int, int | None], int] = {}
        self.expires_at: float | None = None
        #: Networks never blocked, by tenant id (``None``: every tenant).
        self.allowed: dict[int | None, list[str]] = defaultdict(list)

    def partitions(self, *columns: sa.ColumnElement[Any]) -> Iterator[Sequence[Sequence[Any]]]:
        statement = sa.select(*columns).execution_options(yield_per=_STREAM_ROWS)
        yield from self.connection.execute(statement).partitions()

    def rows(self, *columns: sa.ColumnElement[Any]) -> Iterator[Sequence[Any]]:
        for partition in self.partitions(*columns):
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
            tenants[name] = TenantConfig(
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
                ip_allow=tuple(self.network(n) for n in self.allowed.get(tenant_id, ())),
                country_mode=_COUNTRY_MODES[row[14]],
                countries=self.countries(row[15]),
                reservation_mode=ReservationMode(row[16]),
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
        c = _TABLES["extensions"].c
        extensions: dict[tuple[str, str], ExtensionConfig] = {}
        for row in self.rows(
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
            extension_id, tenant_id, name = row[0], row[1], row[2]
            tenant = tenant_names[tenant_id]
            profile, allowed = (
                profiles[row[3]]
                if row[3] is not None
                else named.get((tenant_id, DEFAULT_PROFILE), fallback)
            )
            scope = (tenant_id, extension_id)
            extensions[tenant, name] = ExtensionConfig(
                tenant=tenant,
                name=name,
                profile=profile,
                allowed_classes=allowed,
                daily_limit=self.raised(scope, row[4]),
                concurrent_limit=row[5],
                ua_mode=_UA_MODES[row[6]],
                ua_value=row[7],
                locked=bool(row[8]),
                lock_reason=row[9] or "",
                networks=networks.get(scope, ()),
                windows=windows.get(scope, ()),
                country_mode=_COUNTRY_MODES[row[10]],
                countries=self.countries(row[11]),
                shadow=bool(row[12]),
            )
        return extensions

    def scanner_patterns(self) -> tuple[str, ...]:
        c = _TABLES["scanner_patterns"].c
        extra = sorted({pattern.lower() for (pattern,) in self.rows(c.pattern)})
        return DEFAULT_SCANNER_PATTERNS + tuple(
            p for p in extra if p not in DEFAULT_SCANNER_PATTERNS
        )

    def rates(self, tenant_names: dict[int, str]) -> tuple[PrefixTable, Mapping[str, PrefixTable]]:
        """The global deck and the tenants' own decks; the hot loop of the whole build."""
        d = _TABLES["rate_decks"].c
        owners: dict[int, str | None] = {}
        for deck_id, tenant_id, name in self.rows(d.id, d.tenant_id, d.name):
            if tenant_id is not None:
                owners[deck_id] = tenant_names[tenant_id]
            elif name == GLOBAL_DECK:
                owners[deck_id] = None
        decks: dict[int, dict[str, Rate]] = {deck_id: {} for deck_id in owners}
        names: dict[str, str] = {}
        amounts: dict[int, int] = {}
        name_of, amount_of = names.setdefault, amounts.setdefault
        classes, new = _CLASSES, object.__new__
        slots = vars(Rate)
        set_prefix, set_name, set_class, set_rate, set_fee, set_initial, set_subsequent = (
            slots[field].__set__ for field in _RATE_FIELDS
        )
        r = _TABLES["rates"].c
        last_deck, deck = -1, {}
        for partition in self.partitions(
            r.deck_id,
            r.prefix,
            r.name,
            r.dest_class,
            r.rate_per_minute,
            r.connect_fee,
            r.initial_increment,
            r.subsequent_increment,
        ):
            for (
                deck_id,
                prefix,
                name,
                dest_class,
                per_minute,
                fee,
                initial,
                subsequent,
            ) in partition:
                if deck_id != last_deck:
                    last_deck, deck = deck_id, decks.get(deck_id, {})
                rate = new(Rate)
                set_prefix(rate, prefix)
                set_name(rate, name_of(name, name))
                set_class(rate, classes[dest_class])
                set_rate(rate, amount_of(per_minute, per_minute))
                set_fee(rate, amount_of(fee, fee))
                set_initial(rate, initial)
                set_subsequent(rate, subsequent)
                deck[prefix] = rate
        global_rates: dict[str, Rate] = {}
        tenant_rates: dict[str, PrefixTable] = {}
        for deck_id, owner in owners.items():
            if owner is None:
                global_rates = decks[deck_id]
            elif decks[deck_id]:
                tenant_rates[owner] = PrefixTable(decks[deck_id])
        return PrefixTable(global_rates), MappingProxyType(tenant_rates)


def _epoch(moment: datetime) -> float:
    """Epoch seconds of a stored time (SQLite hands back naive datetimes, written as UTC)."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def _windows(rows: Iterable[tuple[int, int, int]]) -> tuple[WeeklyWindow, ...]:
    return tuple(WeeklyWindow(weekday, start, end) for weekday, start, end in sorted(rows))
