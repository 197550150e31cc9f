"""Validated reads and writes of the SQL configuration store: the API under the admin CLI.

Every write is one transaction that also records an audit event (``record_admin_change``) and
bumps the configuration version (``bump_version``), so that every guard reloads its snapshot.
Functions take an ``Engine`` and return frozen dataclasses: ORM objects never leave this module.
Bad input raises ``ValidationError`` naming the field, a missing object ``NotFoundError``, a
failing database ``ConfigStoreError``. Money is always ``int`` sub-units (``guard.money``).
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from ipaddress import ip_network
from typing import Any, Final, Literal, TypeAlias, TypedDict, TypeVar, Unpack, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, joinedload

from guard.config.db import session_scope
from guard.config.models import (
    AuditEvent,
    Base,
    ConfigMeta,
    DestinationRuleRow,
    EmergencyNumber,
    Extension,
    IpAllow,
    LimitRaise,
    Network,
    RateDeck,
    RoutingProfile,
    ScannerPattern,
    Tenant,
    TimeWindow,
)
from guard.domain import CountryMode, DestinationClass, FailMode, Rate, ReservationMode, UaLockMode
from guard.errors import NotFoundError, ValidationError
from guard.money import MAX_AMOUNT, MAX_CALL_SECONDS, MAX_RATE, format_money, parse_money
from guard.snapshot import DEFAULT_EMERGENCY_NUMBERS, DEFAULT_SCANNER_PATTERNS, IPNetwork

# The profiles every new tenant gets, and an extension's without one: defined in guard.snapshot
# (light enough for the CLI's option help to import), re-exported here.
from guard.snapshot import DEFAULT_PROFILE as DEFAULT_PROFILE
from guard.snapshot import DEFAULT_PROFILES as DEFAULT_PROFILES

#: Name of the global rate deck (so no tenant may be called that).
GLOBAL_DECK = "global"
VERSION_KEY = "version"
MAX_CONCURRENT = 100_000
#: Shortest interval slice: an extension every few seconds would be all overhead.
MIN_SLICE_SECONDS = 30
MAX_INCREMENT = 3600
RATE_COLUMNS: Final = (
    "prefix",
    "name",
    "class",
    "rate_per_minute",
    "connect_fee",
    "initial_increment",
    "subsequent_increment",
)
WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EXTENSION = re.compile(r"[A-Za-z0-9_.@+-]{1,80}")
_HHMM = re.compile(r"([0-9]{1,2}):([0-9]{2})")
_INCREMENT = re.compile(r"[0-9]{1,4}")
_PREFIX = re.compile(r"[0-9]{1,32}")
#: Rows per INSERT executemany / per COPY when importing a deck.
_CHUNK = 5_000
_COPY_CHUNK = 100_000
#: The ``rates`` columns an import writes, in the order ``_insert_rates`` produces them.
_RATE_FIELDS: Final = (
    "deck_id",
    "prefix",
    "name",
    "dest_class",
    "rate_per_minute",
    "connect_fee",
    "initial_increment",
    "subsequent_increment",
)
_RATES = Base.metadata.tables["rates"]
_META = Base.metadata.tables["config_meta"]


class _Unset(Enum):
    UNSET = "unset"


#: Default of the ``set_*`` arguments: leave the field as it is (``None`` means "no limit").
UNSET: Final = _Unset.UNSET
_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)
Keep: TypeAlias = _T | Literal[_Unset.UNSET]


class ImportMode(StrEnum):
    #: Delete the whole deck, then insert the new rows.
    REPLACE = "replace"
    #: Insert new prefixes and overwrite existing ones; other rows stay.
    MERGE = "merge"


# --- returned values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    timezone: str
    currency: str
    daily_limit: int | None
    concurrent_limit: int | None
    fail_mode: FailMode
    international_prefix: str
    national_prefix: str
    country_code: str
    max_call_seconds: int
    enabled: bool
    created_at: datetime
    reservation_mode: ReservationMode = ReservationMode.CALL
    slice_seconds: int = 300
    #: Shadow mode (``guard.shadow``): judged, never refused but for the perimeter if enforced.
    shadow: bool = False
    shadow_enforce_perimeter: bool = True


@dataclass(frozen=True, slots=True)
class ExtensionInfo:
    tenant: str
    name: str
    #: The assigned routing profile, ``None`` for the default (``domestic``).
    profile: str | None
    daily_limit: int | None
    concurrent_limit: int | None
    ua_mode: UaLockMode
    ua_value: str | None
    locked: bool
    lock_reason: str
    locked_at: datetime | None
    created_at: datetime
    #: Shadow mode for this extension alone (the tenant's covers every extension).
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    tenant: str
    #: ``None`` for a network of the whole tenant.
    extension: str | None
    cidr: str
    note: str


@dataclass(frozen=True, slots=True)
class WindowInfo:
    id: int
    tenant: str
    extension: str | None
    weekday: int
    start_minute: int
    end_minute: int

    def __str__(self) -> str:
        return f"{WEEKDAYS[self.weekday]} {_hhmm(self.start_minute)}-{_hhmm(self.end_minute)}"


@dataclass(frozen=True, slots=True)
class ProfileInfo:
    #: ``None`` for a global profile.
    tenant: str | None
    name: str
    classes: tuple[DestinationClass, ...]


@dataclass(frozen=True, slots=True)
class RuleInfo:
    id: int
    tenant: str | None
    prefix: str | None
    dest_class: DestinationClass | None
    max_rate: int | None
    note: str


@dataclass(frozen=True, slots=True)
class DeckInfo:
    name: str
    tenant: str | None
    rates: int


@dataclass(frozen=True, slots=True)
class ImportResult:
    deck: str
    mode: ImportMode
    #: Rows written.
    imported: int
    #: Rows removed first: the whole old deck (replace) or the overwritten prefixes (merge).
    deleted: int
    #: Rows in the deck afterwards.
    total: int


@dataclass(frozen=True, slots=True)
class RateCsvError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


# --- audit and version -------------------------------------------------------------------------


def default_actor() -> str:
    """Who is running the CLI: the sudo caller if any, else the login name."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def record_admin_change(
    session: Session,
    actor: str,
    kind: str,
    tenant: str | None,
    extension: str | None,
    detail: dict[str, Any],
) -> None:
    """Add the audit event of one admin change to ``session``'s transaction."""
    session.add(
        AuditEvent(
            kind=kind,
            tenant=tenant or "",
            extension=extension or "",
            actor=actor[:64],
            detail=json.dumps(detail, sort_keys=True, default=str),
        )
    )


def bump_version(session: Session) -> int:
    """Increment the configuration version in ``session``'s transaction and return it.

    The row update also serializes concurrent writers on PostgreSQL.
    """
    bumped = session.execute(
        sa.update(_META)
        .where(_META.c.key == VERSION_KEY)
        .values(value=_META.c.value + 1)
        .returning(_META.c.value)
    ).scalar_one_or_none()
    if bumped is not None:
        return int(bumped)
    session.add(ConfigMeta(key=VERSION_KEY, value=1))
    session.flush()
    return 1


def read_version(engine: Engine) -> int:
    """The current configuration version (0 before the first write)."""
    with session_scope(engine, write=False) as session:
        value = session.execute(
            sa.select(_META.c.value).where(_META.c.key == VERSION_KEY)
        ).scalar_one_or_none()
    return int(value or 0)


def _changed(
    session: Session,
    actor: str,
    kind: str,
    detail: dict[str, Any],
    *,
    tenant: str | None = None,
    extension: str | None = None,
) -> None:
    record_admin_change(session, actor, f"admin.{kind}", tenant, extension, detail)
    bump_version(session)


# --- field validation --------------------------------------------------------------------------


def _matching(field: str, pattern: re.Pattern[str], value: str, hint: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValidationError(field, f"invalid {value!r}: {hint}")
    return value


def _tenant_name(value: str) -> str:
    name = _matching("name", _NAME, value, "1-64 characters of A-Z a-z 0-9 _ . -")
    if name == GLOBAL_DECK:
        raise ValidationError("name", f"{GLOBAL_DECK!r} is reserved for the global rate deck")
    return name


def _profile_name(value: str) -> str:
    return _matching("profile", _NAME, value, "1-64 characters of A-Z a-z 0-9 _ . -")


def _extension_name(value: str) -> str:
    return _matching("extension", _EXTENSION, value, "1-80 characters of A-Z a-z 0-9 _ . @ + -")


def _digits(field: str, value: str, low: int, high: int) -> str:
    pattern = re.compile(f"[0-9]{{{low},{high}}}")
    return _matching(field, pattern, value, f"{low}-{high} digits")


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValidationError(
            "timezone", f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)"
        ) from None
    return value


def _currency(value: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]{3}", value):
        raise ValidationError("currency", f"invalid {value!r}: three letters such as EUR")
    return value.upper()


def _amount(field: str, value: int | None, maximum: int = MAX_AMOUNT) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer number of sub-units, not {value!r}")
    if value < 0:
        raise ValidationError(field, f"must not be negative: {format_money(value)}")
    if value > maximum:
        raise ValidationError(field, f"{format_money(value)} is above {format_money(maximum)}")
    return value


def _money(field: str, text: str) -> int:
    """A decimal CSV amount (``"0.0125"``) → sub-units, at most ``MAX_RATE``."""
    amount = parse_money(text, field)
    if amount > MAX_RATE:
        raise ValidationError(field, f"{text} is above {format_money(MAX_RATE)}")
    return amount


def _bounded(field: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(field, f"must be an integer from {low} to {high}, not {value!r}")
    return value


def _concurrent(field: str, value: int | None) -> int | None:
    return None if value is None else _bounded(field, value, 0, MAX_CONCURRENT)


def _enum(field: str, kind: type[_E], value: str) -> _E:
    try:
        return kind(value.strip().lower() if isinstance(value, str) else value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ValidationError(field, f"invalid {value!r}: one of {choices}") from None


def _text(field: str, value: str, high: int, *, low: int = 0) -> str:
    if not isinstance(value, str) or not low <= len(value) <= high or not value.isprintable():
        raise ValidationError(field, f"must be {low}-{high} printable characters")
    return value


def _flag(field: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, f"must be true or false, not {value!r}")
    return value


class TenantFields(TypedDict, total=False):
    """A tenant's settable fields, the keyword arguments of ``add_tenant`` (a missing one takes
    its ``TENANT_DEFAULTS`` value) and ``set_tenant`` (a missing one stays as it is); each is
    checked by its validator in ``_TENANT_FIELDS``. A new field goes in all three."""

    timezone: str
    currency: str
    daily_limit: int | None
    concurrent_limit: int | None
    fail_mode: str
    international_prefix: str
    national_prefix: str
    country_code: str
    max_call_seconds: int
    enabled: bool
    reservation_mode: str
    slice_seconds: int
    shadow: bool
    shadow_enforce_perimeter: bool


#: What a new tenant gets for the fields ``add_tenant`` is not given (``None``: no limit).
TENANT_DEFAULTS: Final[TenantFields] = {
    "timezone": "UTC",
    "currency": "EUR",
    "daily_limit": None,
    "concurrent_limit": None,
    "fail_mode": FailMode.DENY,
    "international_prefix": "00",
    "national_prefix": "0",
    "country_code": "",
    "max_call_seconds": 3600,
    "enabled": True,
    "reservation_mode": ReservationMode.CALL,
    "slice_seconds": 300,
    "shadow": False,
    "shadow_enforce_perimeter": True,
}

#: The validator of each ``TenantFields`` field: what it takes, as it is stored.
_TENANT_FIELDS: Final[dict[str, Callable[[Any], Any]]] = {
    "timezone": _timezone,
    "currency": _currency,
    "daily_limit": lambda v: _amount("daily_limit", v),
    "concurrent_limit": lambda v: _concurrent("concurrent_limit", v),
    "fail_mode": lambda v: _enum("fail_mode", FailMode, v).value,
    "international_prefix": lambda v: _digits("international_prefix", v, 1, 8),
    "national_prefix": lambda v: _digits("national_prefix", v, 0, 8),
    "country_code": lambda v: _digits("country_code", v, 0, 4),
    "max_call_seconds": lambda v: _bounded("max_call_seconds", v, 1, MAX_CALL_SECONDS),
    "enabled": lambda v: _flag("enabled", v),
    "reservation_mode": lambda v: _enum("reservation_mode", ReservationMode, v).value,
    "slice_seconds": lambda v: _bounded("slice_seconds", v, MIN_SLICE_SECONDS, MAX_CALL_SECONDS),
    "shadow": lambda v: _flag("shadow", v),
    "shadow_enforce_perimeter": lambda v: _flag("shadow_enforce_perimeter", v),
}


def _validated(fields: dict[str, Callable[[Any], Any]], values: dict[str, Any]) -> dict[str, Any]:
    """The given (not ``UNSET``) values, each through its validator."""
    return {key: fields[key](value) for key, value in values.items() if value is not UNSET}


def parse_cidr(text: str) -> IPNetwork:
    """An IPv4/IPv6 network; a host address is a /32 or /128, host bits set is an error."""
    candidate = text.strip() if isinstance(text, str) else text
    try:
        return ip_network(candidate, strict=True)
    except ValueError:
        try:
            loose = ip_network(candidate, strict=False)
        except ValueError:
            raise ValidationError("cidr", f"not an IPv4 or IPv6 network: {text!r}") from None
        raise ValidationError("cidr", f"host bits set in {text}, did you mean {loose}?") from None


def parse_weekdays(text: str) -> tuple[int, ...]:
    """``mon``, ``0``, ``mon,wed``, ``mon-fri``, ``fri-mon`` (wraps) or ``*`` → weekday numbers
    (0 = Monday)."""
    if not isinstance(text, str) or not text.strip():
        raise ValidationError("weekday", "empty: use mon..sun, 0-6, ranges like mon-fri, or *")
    if text.strip() == "*":
        return tuple(range(7))
    days: list[int] = []
    for part in text.split(","):
        ends = [_weekday(end) for end in part.split("-")]
        if len(ends) > 2:
            raise ValidationError("weekday", f"invalid range {part.strip()!r}")
        first, last = ends[0], ends[-1]
        span = [(first + step) % 7 for step in range((last - first) % 7 + 1)]
        days.extend(day for day in span if day not in days)
    return tuple(sorted(days))


def _weekday(text: str) -> int:
    token = text.strip().lower()
    if token in WEEKDAYS:
        return WEEKDAYS.index(token)
    if re.fullmatch("[0-6]", token):
        return int(token)
    raise ValidationError("weekday", f"invalid day {text.strip()!r}: use mon..sun or 0-6")


def parse_hours(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` → (start, end) minutes after midnight. ``24:00`` may end a window; an
    end at or before the start crosses midnight; ``00:00-24:00`` is the whole day."""
    parts = text.split("-") if isinstance(text, str) else []
    if len(parts) != 2:
        raise ValidationError("hours", f"invalid {text!r}: expected HH:MM-HH:MM")
    start, end = _minute(parts[0], allow_24=False), _minute(parts[1], allow_24=True)
    if start == end:
        raise ValidationError(
            "hours", f"empty window {text!r}: start and end are equal (whole day: 00:00-24:00)"
        )
    return start, end


def _minute(text: str, *, allow_24: bool) -> int:
    match = _HHMM.fullmatch(text.strip())
    if match is None:
        raise ValidationError("hours", f"invalid time {text.strip()!r}: expected HH:MM")
    hours, minutes = int(match[1]), int(match[2])
    if allow_24 and hours == 24 and minutes == 0:
        return 1440
    if hours > 23 or minutes > 59:
        limit = "00:00-24:00" if allow_24 else "00:00-23:59"
        raise ValidationError("hours", f"invalid time {text.strip()!r}: must be within {limit}")
    return hours * 60 + minutes


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_classes(value: str | Iterable[str]) -> tuple[DestinationClass, ...]:
    """Comma-separated or iterable class names → distinct classes in canonical order."""
    items = value.split(",") if isinstance(value, str) else list(value)
    chosen = {_enum("classes", DestinationClass, item) for item in items if item.strip()}
    return tuple(member for member in DestinationClass if member in chosen)


def _stored_classes(classes: str) -> tuple[DestinationClass, ...]:
    return tuple(DestinationClass(item) for item in classes.split(",") if item)


# --- lookups inside a session ------------------------------------------------------------------


def _tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalars(sa.select(Tenant).where(Tenant.name == name)).one_or_none()
    if tenant is None:
        raise NotFoundError(f"tenant {name!r} does not exist")
    return tenant


def _extension(session: Session, tenant: Tenant, name: str) -> Extension:
    extension = session.scalars(
        sa.select(Extension).where(Extension.tenant_id == tenant.id, Extension.name == name)
    ).one_or_none()
    if extension is None:
        raise NotFoundError(f"extension {name!r} of tenant {tenant.name!r} does not exist")
    return extension


def _scope(session: Session, tenant: str, extension: str | None) -> tuple[Tenant, Extension | None]:
    owner = _tenant(session, tenant)
    return owner, None if extension is None else _extension(session, owner, extension)


def _owned_profile(session: Session, tenant_id: int | None, name: str) -> RoutingProfile | None:
    owner = (
        RoutingProfile.tenant_id.is_(None)
        if tenant_id is None
        else RoutingProfile.tenant_id == tenant_id
    )
    return session.scalars(
        sa.select(RoutingProfile).where(owner, RoutingProfile.name == name)
    ).one_or_none()


def _resolve_profile(session: Session, tenant: Tenant, name: str) -> RoutingProfile:
    """The tenant's own profile of that name, else the global one."""
    profile = _owned_profile(session, tenant.id, name) or _owned_profile(session, None, name)
    if profile is None:
        raise NotFoundError(
            f"routing profile {name!r} exists neither for tenant {tenant.name!r} nor globally"
        )
    return profile


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _tenant_info(tenant: Tenant) -> TenantInfo:
    return TenantInfo(
        name=tenant.name,
        timezone=tenant.timezone,
        currency=tenant.currency,
        daily_limit=tenant.daily_limit,
        concurrent_limit=tenant.concurrent_limit,
        fail_mode=FailMode(tenant.fail_mode),
        international_prefix=tenant.international_prefix,
        national_prefix=tenant.national_prefix,
        country_code=tenant.country_code,
        max_call_seconds=tenant.max_call_seconds,
        enabled=tenant.enabled,
        created_at=_aware(tenant.created_at),
        reservation_mode=ReservationMode(tenant.reservation_mode),
        slice_seconds=tenant.slice_seconds,
        shadow=tenant.shadow,
        shadow_enforce_perimeter=tenant.shadow_enforce_perimeter,
    )


def _extension_info(tenant: str, extension: Extension) -> ExtensionInfo:
    return ExtensionInfo(
        tenant=tenant,
        name=extension.name,
        profile=extension.profile.name if extension.profile is not None else None,
        daily_limit=extension.daily_limit,
        concurrent_limit=extension.concurrent_limit,
        ua_mode=UaLockMode(extension.ua_mode),
        ua_value=extension.ua_value,
        locked=extension.locked,
        lock_reason=extension.lock_reason,
        locked_at=_aware(extension.locked_at) if extension.locked_at is not None else None,
        created_at=_aware(extension.created_at),
        shadow=extension.shadow,
    )


# --- tenants -----------------------------------------------------------------------------------


def add_tenant(
    engine: Engine, name: str, *, actor: str, **fields: Unpack[TenantFields]
) -> TenantInfo:
    """Create a tenant with its ``domestic`` and ``international`` routing profiles."""
    name = _tenant_name(name)
    values = _validated(_TENANT_FIELDS, {**TENANT_DEFAULTS, **fields})
    with session_scope(engine) as session:
        if session.scalars(sa.select(Tenant.id).where(Tenant.name == name)).first() is not None:
            raise ValidationError("name", f"tenant {name!r} already exists")
        tenant = Tenant(name=name, **values)
        session.add(tenant)
        session.flush()
        session.add_all(
            RoutingProfile(
                tenant_id=tenant.id, name=profile, classes=",".join(c.value for c in classes)
            )
            for profile, classes in DEFAULT_PROFILES.items()
        )
        _changed(session, actor, "tenant.add", {"name": name, **values}, tenant=name)
        return _tenant_info(tenant)


def set_tenant(
    engine: Engine, name: str, *, actor: str, **changes: Unpack[TenantFields]
) -> TenantInfo:
    """Change the given fields of a tenant (``None`` limits mean "no limit")."""
    validated = _validated(_TENANT_FIELDS, dict(changes))
    if not validated:
        raise ValidationError("changes", "nothing to change")
    with session_scope(engine) as session:
        tenant = _tenant(session, name)
        for key, value in validated.items():
            setattr(tenant, key, value)
        _changed(session, actor, "tenant.set", validated, tenant=name)
        return _tenant_info(tenant)


def get_tenant(engine: Engine, name: str) -> TenantInfo:
    with session_scope(engine, write=False) as session:
        return _tenant_info(_tenant(session, name))


def list_tenants(engine: Engine) -> list[TenantInfo]:
    with session_scope(engine, write=False) as session:
        return [_tenant_info(t) for t in session.scalars(sa.select(Tenant).order_by(Tenant.name))]


def tenants_in_shadow_mode(engine: Engine) -> set[str]:
    """The names of the tenants in shadow mode (``guard.shadow``): the tenant is, or one of its
    extensions is."""
    shadowed = sa.select(Extension.tenant_id).where(Extension.shadow)
    query = sa.select(Tenant.name).where(sa.or_(Tenant.shadow, Tenant.id.in_(shadowed)))
    with session_scope(engine, write=False) as session:
        return set(session.scalars(query))


def remove_tenant(engine: Engine, name: str, *, actor: str) -> None:
    """Delete a tenant with everything it owns (extensions, networks, deck, rules, …)."""
    with session_scope(engine) as session:
        session.delete(_tenant(session, name))
        _changed(session, actor, "tenant.remove", {"name": name}, tenant=name)


# --- extensions --------------------------------------------------------------------------------


def _ua_value(mode: UaLockMode, value: str | None) -> str | None:
    if mode is UaLockMode.OFF:
        if value is not None:
            raise ValidationError("ua_value", "only the pin and learn modes take a User-Agent")
        return None
    if mode is UaLockMode.PIN and value is None:
        raise ValidationError("ua_value", "the pin mode needs a User-Agent pattern")
    return None if value is None else _text("ua_value", value, 255, low=1)


def add_extension(
    engine: Engine,
    tenant: str,
    name: str,
    *,
    actor: str,
    profile: str | None = None,
    daily_limit: int | None = None,
    concurrent_limit: int | None = None,
    ua_mode: str = UaLockMode.OFF,
    ua_value: str | None = None,
) -> ExtensionInfo:
    """Create an extension. ``profile`` is looked up as the tenant's own, then a global one;
    ``None`` gives the ``domestic`` classes. ``ua_value``: the ``pin`` glob, or a pre-learned
    User-Agent for ``learn``."""
    name = _extension_name(name)
    mode = _enum("ua_mode", UaLockMode, ua_mode)
    values = {
        "daily_limit": _amount("daily_limit", daily_limit),
        "concurrent_limit": _concurrent("concurrent_limit", concurrent_limit),
        "ua_mode": mode.value,
        "ua_value": _ua_value(mode, ua_value),
    }
    with session_scope(engine) as session:
        owner = _tenant(session, tenant)
        exists = sa.select(Extension.id).where(
            Extension.tenant_id == owner.id, Extension.name == name
        )
        if session.scalars(exists).first() is not None:
            raise ValidationError("extension", f"extension {name!r} of {tenant!r} already exists")
        chosen = None if profile is None else _resolve_profile(session, owner, profile)
        extension = Extension(tenant_id=owner.id, name=name, profile=chosen, **values)
        session.add(extension)
        detail = {"name": name, "profile": profile, **values}
        _changed(session, actor, "extension.add", detail, tenant=tenant, extension=name)
        session.flush()
        return _extension_info(tenant, extension)


def set_extension(
    engine: Engine,
    tenant: str,
    name: str,
    *,
    actor: str,
    profile: Keep[str | None] = UNSET,
    daily_limit: Keep[int | None] = UNSET,
    concurrent_limit: Keep[int | None] = UNSET,
    ua_mode: Keep[str] = UNSET,
    ua_value: Keep[str | None] = UNSET,
    shadow: Keep[bool] = UNSET,
) -> ExtensionInfo:
    """Change the given fields. Switching ``ua_mode`` clears the User-Agent unless ``ua_value``
    is given too (so ``learn`` starts learning afresh)."""
    changes = _validated(
        {
            "daily_limit": lambda v: _amount("daily_limit", v),
            "concurrent_limit": lambda v: _concurrent("concurrent_limit", v),
            "shadow": lambda v: _flag("shadow", v),
        },
        {"daily_limit": daily_limit, "concurrent_limit": concurrent_limit, "shadow": shadow},
    )
    if profile is UNSET and ua_mode is UNSET and ua_value is UNSET and not changes:
        raise ValidationError("changes", "nothing to change")
    with session_scope(engine) as session:
        owner = _tenant(session, tenant)
        extension = _extension(session, owner, name)
        if ua_mode is not UNSET or ua_value is not UNSET:
            old = UaLockMode(extension.ua_mode)
            mode = old if ua_mode is UNSET else _enum("ua_mode", UaLockMode, ua_mode)
            kept = extension.ua_value if mode is old else None
            changes["ua_mode"] = mode.value
            changes["ua_value"] = _ua_value(mode, kept if ua_value is UNSET else ua_value)
        for key, value in changes.items():
            setattr(extension, key, value)
        if profile is not UNSET:
            extension.profile = (
                None if profile is None else _resolve_profile(session, owner, profile)
            )
            changes["profile"] = profile
        _changed(session, actor, "extension.set", changes, tenant=tenant, extension=name)
        return _extension_info(tenant, extension)


def get_extension(engine: Engine, tenant: str, name: str) -> ExtensionInfo:
    with session_scope(engine, write=False) as session:
        return _extension_info(tenant, _extension(session, _tenant(session, tenant), name))


def list_extensions(engine: Engine, tenant: str) -> list[ExtensionInfo]:
    with session_scope(engine, write=False) as session:
        owner = _tenant(session, tenant)
        query = (
            sa.select(Extension)
            .where(Extension.tenant_id == owner.id)
            .options(joinedload(Extension.profile))
            .order_by(Extension.name)
        )
        return [_extension_info(tenant, e) for e in session.scalars(query)]


def remove_extension(engine: Engine, tenant: str, name: str, *, actor: str) -> None:
    with session_scope(engine) as session:
        session.delete(_extension(session, _tenant(session, tenant), name))
        _changed(session, actor, "extension.remove", {}, tenant=tenant, extension=name)


def lock_extension(
    engine: Engine, tenant: str, name: str, *, actor: str, reason: str = "locked by an admin"
) -> ExtensionInfo:
    """Refuse every call of the extension until ``unlock_extension``."""
    reason = _text("reason", reason, 255)
    with session_scope(engine) as session:
        extension = _extension(session, _tenant(session, tenant), name)
        extension.locked, extension.lock_reason = True, reason
        extension.locked_at = datetime.now(UTC)
        _changed(
            session, actor, "extension.lock", {"reason": reason}, tenant=tenant, extension=name
        )
        return _extension_info(tenant, extension)


def unlock_extension(
    engine: Engine, tenant: str, name: str, *, actor: str, relearn: bool = False
) -> ExtensionInfo:
    """Lift a lock. ``relearn`` forgets a learned User-Agent so the next one is learned."""
    with session_scope(engine) as session:
        extension = _extension(session, _tenant(session, tenant), name)
        extension.locked, extension.lock_reason, extension.locked_at = False, "", None
        if relearn and extension.ua_mode == UaLockMode.LEARN:
            extension.ua_value = None
        detail = {"relearn": relearn}
        _changed(session, actor, "extension.unlock", detail, tenant=tenant, extension=name)
        return _extension_info(tenant, extension)


# --- networks and time windows -----------------------------------------------------------------


def add_network(
    engine: Engine,
    tenant: str,
    cidr: str,
    *,
    actor: str,
    extension: str | None = None,
    note: str = "",
) -> NetworkInfo:
    """Allow calls from ``cidr`` for the tenant, or for one extension only."""
    network = str(parse_cidr(cidr))
    note = _text("note", note, 255)
    with session_scope(engine) as session:
        owner, ext = _scope(session, tenant, extension)
        if _network_rows(session, owner, ext, network):
            raise ValidationError("cidr", f"{network} is already allowed there")
        session.add(
            Network(
                tenant_id=owner.id, extension_id=ext.id if ext else None, cidr=network, note=note
            )
        )
        _changed(
            session, actor, "network.add", {"cidr": network}, tenant=tenant, extension=extension
        )
    return NetworkInfo(tenant=tenant, extension=extension, cidr=network, note=note)


def _network_rows(
    session: Session, owner: Tenant, ext: Extension | None, cidr: str
) -> list[Network]:
    scope = Network.extension_id.is_(None) if ext is None else Network.extension_id == ext.id
    query = sa.select(Network).where(Network.tenant_id == owner.id, scope, Network.cidr == cidr)
    return list(session.scalars(query))


def remove_network(
    engine: Engine, tenant: str, cidr: str, *, actor: str, extension: str | None = None
) -> None:
    network = str(parse_cidr(cidr))
    with session_scope(engine) as session:
        owner, ext = _scope(session, tenant, extension)
        rows = _network_rows(session, owner, ext, network)
        if not rows:
            raise NotFoundError(f"network {network} is not allowed there")
        for row in rows:
            session.delete(row)
        detail = {"cidr": network}
        _changed(session, actor, "network.remove", detail, tenant=tenant, extension=extension)


def list_networks(
    engine: Engine, tenant: str, *, extension: str | None = None
) -> list[NetworkInfo]:
    """The extension's networks, or with ``extension=None`` every network of the tenant."""
    with session_scope(engine, write=False) as session:
        owner, ext = _scope(session, tenant, extension)
        query = (
            sa.select(Network.cidr, Network.note, Extension.name)
            .outerjoin(Extension, Network.extension_id == Extension.id)
            .where(Network.tenant_id == owner.id)
            .order_by(Extension.name.is_not(None), Extension.name, Network.id)
        )
        if ext is not None:
            query = query.where(Network.extension_id == ext.id)
        return [
            NetworkInfo(tenant=tenant, extension=ext_name, cidr=cidr, note=note)
            for cidr, note, ext_name in session.execute(query)
        ]


def add_window(
    engine: Engine,
    tenant: str,
    weekdays: str,
    hours: str,
    *,
    actor: str,
    extension: str | None = None,
) -> list[WindowInfo]:
    """Allow calls on ``weekdays`` (e.g. ``mon-fri``) during ``hours`` (e.g. ``08:00-18:00``);
    one row per day."""
    days = parse_weekdays(weekdays)
    start, end = parse_hours(hours)
    with session_scope(engine) as session:
        owner, ext = _scope(session, tenant, extension)
        ext_id = ext.id if ext else None
        rows = [
            TimeWindow(
                tenant_id=owner.id,
                extension_id=ext_id,
                weekday=d,
                start_minute=start,
                end_minute=end,
            )
            for d in days
        ]
        for row in rows:
            if _window_rows(session, row):
                info = WindowInfo(0, tenant, extension, row.weekday, start, end)
                raise ValidationError("weekday", f"window {info} already exists")
        session.add_all(rows)
        session.flush()
        detail = {"weekdays": list(days), "start_minute": start, "end_minute": end}
        _changed(session, actor, "window.add", detail, tenant=tenant, extension=extension)
        return [WindowInfo(r.id, tenant, extension, r.weekday, start, end) for r in rows]


def _window_rows(session: Session, like: TimeWindow) -> list[TimeWindow]:
    scope = (
        TimeWindow.extension_id.is_(None)
        if like.extension_id is None
        else TimeWindow.extension_id == like.extension_id
    )
    query = sa.select(TimeWindow).where(
        TimeWindow.tenant_id == like.tenant_id,
        scope,
        TimeWindow.weekday == like.weekday,
        TimeWindow.start_minute == like.start_minute,
        TimeWindow.end_minute == like.end_minute,
    )
    return list(session.scalars(query))


def remove_window(engine: Engine, tenant: str, window_id: int, *, actor: str) -> None:
    """Delete one window by the id ``list_windows`` shows."""
    with session_scope(engine) as session:
        owner = _tenant(session, tenant)
        row = session.get(TimeWindow, window_id)
        if row is None or row.tenant_id != owner.id:
            raise NotFoundError(f"time window {window_id} of tenant {tenant!r} does not exist")
        session.delete(row)
        _changed(session, actor, "window.remove", {"id": window_id}, tenant=tenant)


def list_windows(engine: Engine, tenant: str, *, extension: str | None = None) -> list[WindowInfo]:
    """The extension's windows, or with ``extension=None`` every window of the tenant."""
    with session_scope(engine, write=False) as session:
        owner, ext = _scope(session, tenant, extension)
        query = (
            sa.select(TimeWindow, Extension.name)
            .outerjoin(Extension, TimeWindow.extension_id == Extension.id)
            .where(TimeWindow.tenant_id == owner.id)
            .order_by(
                Extension.name.is_not(None),
                Extension.name,
                TimeWindow.weekday,
                TimeWindow.start_minute,
            )
        )
        if ext is not None:
            query = query.where(TimeWindow.extension_id == ext.id)
        return [
            WindowInfo(w.id, tenant, ext_name, w.weekday, w.start_minute, w.end_minute)
            for w, ext_name in session.execute(query)
        ]


# --- routing profiles --------------------------------------------------------------------------


def _profile_info(tenant: str | None, profile: RoutingProfile) -> ProfileInfo:
    return ProfileInfo(tenant=tenant, name=profile.name, classes=_stored_classes(profile.classes))


def add_profile(
    engine: Engine,
    name: str,
    classes: str | Iterable[str],
    *,
    actor: str,
    tenant: str | None = None,
) -> ProfileInfo:
    """A routing profile of the tenant, or a global one (``tenant=None``)."""
    name, chosen = _profile_name(name), parse_classes(classes)
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        if _owned_profile(session, tenant_id, name) is not None:
            raise ValidationError("profile", f"profile {name!r} already exists there")
        profile = RoutingProfile(
            tenant_id=tenant_id, name=name, classes=",".join(c.value for c in chosen)
        )
        session.add(profile)
        detail = {"name": name, "classes": [c.value for c in chosen]}
        _changed(session, actor, "profile.add", detail, tenant=tenant)
        return _profile_info(tenant, profile)


def set_profile(
    engine: Engine,
    name: str,
    classes: str | Iterable[str],
    *,
    actor: str,
    tenant: str | None = None,
) -> ProfileInfo:
    """Replace the classes of the tenant's (or the global) profile ``name``."""
    chosen = parse_classes(classes)
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        profile = _owned_profile(session, tenant_id, name)
        if profile is None:
            where = "globally" if tenant is None else f"for tenant {tenant!r}"
            raise NotFoundError(f"routing profile {name!r} does not exist {where}")
        profile.classes = ",".join(c.value for c in chosen)
        detail = {"name": name, "classes": [c.value for c in chosen]}
        _changed(session, actor, "profile.set", detail, tenant=tenant)
        return _profile_info(tenant, profile)


def list_profiles(engine: Engine, *, tenant: str | None = None) -> list[ProfileInfo]:
    """Global profiles, preceded by the tenant's own ones when ``tenant`` is given."""
    with session_scope(engine, write=False) as session:
        found: list[ProfileInfo] = []
        if tenant is not None:
            owner = _tenant(session, tenant)
            own = sa.select(RoutingProfile).where(RoutingProfile.tenant_id == owner.id)
            found += [_profile_info(tenant, p) for p in session.scalars(own.order_by("name"))]
        shared = sa.select(RoutingProfile).where(RoutingProfile.tenant_id.is_(None))
        found += [_profile_info(None, p) for p in session.scalars(shared.order_by("name"))]
        return found


# --- destination rules, emergency numbers, scanner patterns ------------------------------------


def _rule_info(tenant: str | None, rule: DestinationRuleRow) -> RuleInfo:
    return RuleInfo(
        id=rule.id,
        tenant=tenant,
        prefix=rule.prefix,
        dest_class=DestinationClass(rule.dest_class) if rule.dest_class else None,
        max_rate=rule.max_rate,
        note=rule.note,
    )


def add_rule(
    engine: Engine,
    *,
    actor: str,
    tenant: str | None = None,
    prefix: str | None = None,
    dest_class: str | None = None,
    max_rate: int | None = None,
    note: str = "",
) -> RuleInfo:
    """Block destinations by prefix and/or class, or cap their rate (``max_rate``, sub-units per
    minute). Global when ``tenant`` is ``None``."""
    if prefix is None and dest_class is None and max_rate is None:
        raise ValidationError(
            "rule", "give a prefix, a class or a max_rate (an empty rule blocks every call)"
        )
    values = {
        "prefix": None if prefix is None else _digits("prefix", prefix, 1, 32),
        "dest_class": None
        if dest_class is None
        else _enum("dest_class", DestinationClass, dest_class).value,
        "max_rate": _amount("max_rate", max_rate, MAX_RATE),
        "note": _text("note", note, 255),
    }
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        rule = DestinationRuleRow(tenant_id=tenant_id, **values)
        session.add(rule)
        session.flush()
        _changed(session, actor, "rule.add", {"id": rule.id, **values}, tenant=tenant)
        return _rule_info(tenant, rule)


def remove_rule(engine: Engine, rule_id: int, *, actor: str) -> None:
    """Delete a rule by the id ``list_rules`` shows."""
    with session_scope(engine) as session:
        rule = session.get(DestinationRuleRow, rule_id)
        if rule is None:
            raise NotFoundError(f"destination rule {rule_id} does not exist")
        tenant = None if rule.tenant_id is None else session.get(Tenant, rule.tenant_id)
        session.delete(rule)
        _changed(
            session,
            actor,
            "rule.remove",
            {"id": rule_id},
            tenant=tenant.name if tenant is not None else None,
        )


def list_rules(engine: Engine, *, tenant: str | None = None) -> list[RuleInfo]:
    """The tenant's rules, or the global ones (``tenant=None``)."""
    with session_scope(engine, write=False) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        owner = (
            DestinationRuleRow.tenant_id.is_(None)
            if tenant_id is None
            else DestinationRuleRow.tenant_id == tenant_id
        )
        query = sa.select(DestinationRuleRow).where(owner).order_by(DestinationRuleRow.id)
        return [_rule_info(tenant, rule) for rule in session.scalars(query)]


def _emergency_rows(session: Session, tenant_id: int | None, number: str) -> list[EmergencyNumber]:
    owner = (
        EmergencyNumber.tenant_id.is_(None)
        if tenant_id is None
        else EmergencyNumber.tenant_id == tenant_id
    )
    query = sa.select(EmergencyNumber).where(owner, EmergencyNumber.number == number)
    return list(session.scalars(query))


def add_emergency_number(
    engine: Engine, number: str, *, actor: str, tenant: str | None = None
) -> None:
    """An extra always-allowed number for the tenant, or for everyone (``tenant=None``)."""
    number = _digits("number", number, 1, 16)
    if number in DEFAULT_EMERGENCY_NUMBERS:
        raise ValidationError("number", f"{number} is a built-in emergency number already")
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        if _emergency_rows(session, tenant_id, number):
            raise ValidationError("number", f"{number} is an emergency number there already")
        session.add(EmergencyNumber(tenant_id=tenant_id, number=number))
        _changed(session, actor, "emergency.add", {"number": number}, tenant=tenant)


def remove_emergency_number(
    engine: Engine, number: str, *, actor: str, tenant: str | None = None
) -> None:
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        rows = _emergency_rows(session, tenant_id, number)
        if not rows:
            raise NotFoundError(f"emergency number {number!r} is not configured there")
        for row in rows:
            session.delete(row)
        _changed(session, actor, "emergency.remove", {"number": number}, tenant=tenant)


def list_emergency_numbers(engine: Engine, *, tenant: str | None = None) -> list[str]:
    """The configured extra numbers of the tenant, or the global ones (not the built-ins)."""
    with session_scope(engine, write=False) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        owner = (
            EmergencyNumber.tenant_id.is_(None)
            if tenant_id is None
            else EmergencyNumber.tenant_id == tenant_id
        )
        query = sa.select(EmergencyNumber.number).where(owner).order_by(EmergencyNumber.number)
        return list(session.scalars(query))


def _scanner_pattern(pattern: str) -> str:
    return _text(
        "pattern", pattern.strip().lower() if isinstance(pattern, str) else pattern, 128, low=1
    )


def add_scanner_pattern(engine: Engine, pattern: str, *, actor: str) -> None:
    """An extra scanner User-Agent fragment (stored lowercased, matched as a substring)."""
    pattern = _scanner_pattern(pattern)
    if pattern in DEFAULT_SCANNER_PATTERNS:
        raise ValidationError("pattern", f"{pattern!r} is a built-in scanner pattern already")
    with session_scope(engine) as session:
        query = sa.select(ScannerPattern.id).where(ScannerPattern.pattern == pattern)
        if session.scalars(query).first() is not None:
            raise ValidationError("pattern", f"{pattern!r} is configured already")
        session.add(ScannerPattern(pattern=pattern))
        _changed(session, actor, "scanner.add", {"pattern": pattern})


def remove_scanner_pattern(engine: Engine, pattern: str, *, actor: str) -> None:
    pattern = _scanner_pattern(pattern)
    with session_scope(engine) as session:
        row = session.scalars(
            sa.select(ScannerPattern).where(ScannerPattern.pattern == pattern)
        ).one_or_none()
        if row is None:
            raise NotFoundError(f"scanner pattern {pattern!r} is not configured")
        session.delete(row)
        _changed(session, actor, "scanner.remove", {"pattern": pattern})


def list_scanner_patterns(engine: Engine) -> list[str]:
    """The configured extra patterns (the built-ins always apply too)."""
    with session_scope(engine, write=False) as session:
        query = sa.select(ScannerPattern.pattern).order_by(ScannerPattern.pattern)
        return list(session.scalars(query))


# --- rate decks --------------------------------------------------------------------------------


class _RateReader:
    """CSV records (in ``RATE_COLUMNS`` order) → validated ``Rate``s.

    A deck repeats a few thousand names, classes, prices and increments over a million rows,
    so each distinct text is validated once and its value shared by every row using it.
    """

    def __init__(self) -> None:
        self.parsers: dict[str, Callable[[str], Any]] = {
            "name": lambda text: _text("name", text, 128, low=1),
            "class": lambda text: _enum("class", DestinationClass, text),
            "rate_per_minute": lambda text: _money("rate_per_minute", text),
            "connect_fee": lambda text: _money("connect_fee", text),
            "initial_increment": lambda text: _increment("initial_increment", text),
            "subsequent_increment": lambda text: _increment("subsequent_increment", text),
        }
        self.known: dict[str, dict[str, Any]] = {field: {} for field in self.parsers}

    def value(self, field: str, text: str) -> Any:
        known = self.known[field]
        if text not in known:
            known[text] = self.parsers[field](text)
        return known[text]

    def rate(self, fields: Sequence[str]) -> Rate:
        prefix, name, dest_class, per_minute, fee, initial, subsequent = [f.strip() for f in fields]
        if _PREFIX.fullmatch(prefix) is None:
            raise ValidationError("prefix", f"invalid {prefix!r}: 1-32 digits")
        value = self.value
        return Rate(
            prefix,
            value("name", name),
            value("class", dest_class),
            value("rate_per_minute", per_minute),
            value("connect_fee", fee),
            value("initial_increment", initial),
            value("subsequent_increment", subsequent),
        )


def _increment(field: str, text: str) -> int:
    if not _INCREMENT.fullmatch(text) or not 1 <= int(text) <= MAX_INCREMENT:
        raise ValidationError(field, f"invalid {text!r}: whole seconds from 1 to {MAX_INCREMENT}")
    return int(text)


def _check_rate(rate: Rate) -> None:
    """The rules ``parse_rate_csv`` applies, for rows built elsewhere.

    One cheap test per row (a deck has a million); the field-by-field checks run only to name
    what is wrong.
    """
    if (
        type(rate.prefix) is str
        and _PREFIX.fullmatch(rate.prefix) is not None
        and type(rate.name) is str
        and 0 < len(rate.name) <= 128
        and rate.name.isprintable()
        and isinstance(rate.dest_class, DestinationClass)
        and type(rate.rate_per_minute) is int
        and 0 <= rate.rate_per_minute <= MAX_RATE
        and type(rate.connect_fee) is int
        and 0 <= rate.connect_fee <= MAX_RATE
        and type(rate.initial_increment) is int
        and 1 <= rate.initial_increment <= MAX_INCREMENT
        and type(rate.subsequent_increment) is int
        and 1 <= rate.subsequent_increment <= MAX_INCREMENT
    ):
        return
    _digits("prefix", rate.prefix, 1, 32)
    _text("name", rate.name, 128, low=1)
    if not isinstance(rate.dest_class, DestinationClass):
        choices = ", ".join(member.value for member in DestinationClass)
        raise ValidationError("class", f"invalid {rate.dest_class!r}: one of {choices}")
    _amount("rate_per_minute", rate.rate_per_minute, MAX_RATE)
    _amount("connect_fee", rate.connect_fee, MAX_RATE)
    _bounded("initial_increment", rate.initial_increment, 1, MAX_INCREMENT)
    _bounded("subsequent_increment", rate.subsequent_increment, 1, MAX_INCREMENT)


def parse_rate_csv(
    stream: Iterable[str], *, max_errors: int = 100
) -> tuple[list[Rate], list[RateCsvError]]:
    """Read and validate a rate deck CSV; never raises on bad content.

    A header naming exactly ``RATE_COLUMNS`` (any order) is required. Returns the rates and the
    errors with their line numbers; import only when there are no errors. Reading stops after
    ``max_errors`` errors or at broken CSV quoting.
    """
    reader = csv.reader(stream, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        return [], [RateCsvError(reader.line_num, f"broken CSV: {exc}")]
    if header is None:
        return [], [RateCsvError(1, f"empty file: a header is required: {','.join(RATE_COLUMNS)}")]
    problem = _header_problem(header)
    if problem:
        return [], [RateCsvError(1, problem)]
    columns = [name.strip().lstrip("\ufeff").strip().lower() for name in header]
    order = [columns.index(name) for name in RATE_COLUMNS]
    rates: list[Rate] = []
    errors: list[RateCsvError] = []
    first_seen: dict[str, int] = {}
    validator = _RateReader()
    for line, record, error in _records(reader):
        if error is not None:
            errors.append(RateCsvError(line, error))
            break
        if not any(field.strip() for field in record):
            continue
        if len(record) != len(columns):
            errors.append(
                RateCsvError(line, f"expected {len(columns)} fields, found {len(record)}")
            )
        else:
            try:
                rate = validator.rate([record[i] for i in order])
            except ValidationError as exc:
                errors.append(RateCsvError(line, str(exc)))
            else:
                if rate.prefix in first_seen:
                    first = first_seen[rate.prefix]
                    errors.append(
                        RateCsvError(
                            line, f"prefix: duplicate {rate.prefix} (first on line {first})"
                        )
                    )
                else:
                    first_seen[rate.prefix] = line
                    rates.append(rate)
        if len(errors) >= max_errors:
            errors.append(RateCsvError(line, f"stopped after {max_errors} errors"))
            break
    return rates, errors


def _header_problem(header: list[str]) -> str:
    columns = [name.strip().lstrip("\ufeff").strip().lower() for name in header]
    expected = f"expected the header {','.join(RATE_COLUMNS)}"
    unknown = [name for name in columns if name not in RATE_COLUMNS]
    if unknown:
        return f"unknown column {', '.join(map(repr, unknown))}: {expected}"
    doubled = sorted({name for name in columns if columns.count(name) > 1})
    if doubled:
        return f"column {', '.join(map(repr, doubled))} given twice"
    missing = [name for name in RATE_COLUMNS if name not in columns]
    if missing:
        return f"missing column {', '.join(map(repr, missing))}: {expected}"
    return ""


def _records(reader: Any) -> Iterator[tuple[int, list[str], str | None]]:
    """(line, record, None) per record, then (line, [], message) if the CSV turns out broken."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, [], f"broken CSV (quoting?): {exc}"
            return
        yield reader.line_num, record, None


def _deck_owner(session: Session, tenant: str | None) -> tuple[int | None, str]:
    if tenant is None:
        return None, GLOBAL_DECK
    return _tenant(session, tenant).id, tenant


def _find_deck(session: Session, tenant_id: int | None) -> RateDeck | None:
    owner = (
        (RateDeck.tenant_id.is_(None), RateDeck.name == GLOBAL_DECK)
        if tenant_id is None
        else (RateDeck.tenant_id == tenant_id,)
    )
    return session.scalars(sa.select(RateDeck).where(*owner)).one_or_none()


def import_rates(
    engine: Engine,
    rows: Iterable[Rate],
    deck: str | None = None,
    mode: str = ImportMode.REPLACE,
    *,
    actor: str,
) -> ImportResult:
    """Write ``rows`` into the tenant's deck (created on first import) or the global one, in one
    transaction: either every row lands or none does."""
    chosen = _enum("mode", ImportMode, mode)
    rates = list(rows)
    if not rates:
        raise ValidationError("rates", "nothing to import (an empty deck would refuse every call)")
    prefixes: set[str] = set()
    for number, rate in enumerate(rates, start=1):
        try:
            _check_rate(rate)
        except ValidationError as exc:
            raise ValidationError(exc.field, f"row {number}: {exc.message}") from None
        if rate.prefix in prefixes:
            raise ValidationError("prefix", f"row {number}: duplicate prefix {rate.prefix}")
        prefixes.add(rate.prefix)
    with session_scope(engine) as session:
        tenant_id, name = _deck_owner(session, deck)
        found = _find_deck(session, tenant_id)
        if found is None:
            found = RateDeck(name=name, tenant_id=tenant_id)
            session.add(found)
            session.flush()
        deck_id = found.id
        connection = session.connection()
        postgres = connection.dialect.name == "postgresql"
        in_deck = _RATES.c.deck_id == deck_id
        if chosen is ImportMode.REPLACE:
            deleted = connection.execute(sa.delete(_RATES).where(in_deck)).rowcount
        else:
            if postgres:
                # Fresh statistics, or PostgreSQL scans the whole deck for every chunk below.
                connection.exec_driver_sql("ANALYZE rates")
            ordered = sorted(prefixes)
            deleted = sum(
                connection.execute(
                    sa.delete(_RATES).where(in_deck, _RATES.c.prefix.in_(ordered[i : i + 500]))
                ).rowcount
                for i in range(0, len(ordered), 500)
            )
        _insert_rates(connection, deck_id, rates)
        # New rows, new stamp: a snapshot rebuild must read this deck again (see RateDeck.stamp).
        found.stamp = secrets.token_hex(16)
        if postgres:
            connection.exec_driver_sql("ANALYZE rates")
        total = connection.execute(sa.select(sa.func.count()).where(in_deck)).scalar_one()
        detail = {"deck": name, "mode": chosen.value, "imported": len(rates), "deleted": deleted}
        _changed(session, actor, "rates.import", detail, tenant=deck)
    return ImportResult(
        deck=name, mode=chosen, imported=len(rates), deleted=deleted, total=int(total)
    )


def _insert_rates(connection: sa.Connection, deck_id: int, rates: list[Rate]) -> None:
    """Bulk insert: COPY on psycopg2 (a million rows in seconds where batched INSERTs take
    minutes, the per-row foreign-key check being the cost), executemany chunks elsewhere."""

    def values(batch: list[Rate]) -> list[tuple[Any, ...]]:
        return [
            (
                deck_id,
                r.prefix,
                r.name,
                r.dest_class.value,
                r.rate_per_minute,
                r.connect_fee,
                r.initial_increment,
                r.subsequent_increment,
            )
            for r in batch
        ]

    if connection.dialect.driver == "psycopg2":
        cursor = cast(Any, connection.connection.driver_connection).cursor()
        copy = f"COPY {_RATES.name} ({', '.join(_RATE_FIELDS)}) FROM STDIN WITH (FORMAT csv)"
        for start in range(0, len(rates), _COPY_CHUNK):
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(
                values(rates[start : start + _COPY_CHUNK])
            )
            buffer.seek(0)
            cursor.copy_expert(copy, buffer)
        cursor.close()
        return
    insert = sa.insert(_RATES)
    for start in range(0, len(rates), _CHUNK):
        batch = values(rates[start : start + _CHUNK])
        connection.execute(insert, [dict(zip(_RATE_FIELDS, row, strict=True)) for row in batch])


def list_decks(engine: Engine) -> list[DeckInfo]:
    with session_scope(engine, write=False) as session:
        query = (
            sa.select(RateDeck.name, Tenant.name, sa.func.count(_RATES.c.id))
            .outerjoin(Tenant, RateDeck.tenant_id == Tenant.id)
            .outerjoin(_RATES, _RATES.c.deck_id == RateDeck.id)
            .group_by(RateDeck.id, RateDeck.name, Tenant.name)
            .order_by(RateDeck.tenant_id.is_not(None), RateDeck.name)
        )
        return [DeckInfo(name=d, tenant=t, rates=int(n)) for d, t, n in session.execute(query)]


def _rate_of(row: sa.Row[Any]) -> Rate:
    return Rate(
        prefix=row.prefix,
        name=row.name,
        dest_class=DestinationClass(row.dest_class),
        rate_per_minute=row.rate_per_minute,
        connect_fee=row.connect_fee,
        initial_increment=row.initial_increment,
        subsequent_increment=row.subsequent_increment,
    )


def list_rates(engine: Engine, deck: str | None, *, limit: int | None = None) -> list[Rate]:
    """The rates of the tenant's deck, or of the global one (``deck=None``), by prefix; at most
    ``limit`` of them. A deck never imported has none."""
    if limit is not None:
        _bounded("limit", limit, 1, 10_000_000)
    with session_scope(engine, write=False) as session:
        tenant_id, _ = _deck_owner(session, deck)
        found = _find_deck(session, tenant_id)
        if found is None:
            return []
        query = sa.select(_RATES).where(_RATES.c.deck_id == found.id).order_by(_RATES.c.prefix)
        rows = session.execute(query if limit is None else query.limit(limit)).all()
    return [_rate_of(row) for row in rows]


def lookup_rate(engine: Engine, tenant: str | None, number: str) -> Rate | None:
    """The rate the snapshot would use for a normalized ``number``: the tenant's deck first, then
    the global one, longest prefix within each. Reads only the candidate prefixes."""
    number = _digits("number", number, 1, 64)
    candidates = [number[:length] for length in range(1, min(len(number), 32) + 1)]
    with session_scope(engine, write=False) as session:
        tenant_id, _ = _deck_owner(session, tenant)
        decks = [_find_deck(session, tenant_id)] if tenant_id is not None else []
        decks.append(_find_deck(session, None))
        for found in decks:
            if found is None:
                continue
            rows = session.execute(
                sa.select(_RATES).where(
                    _RATES.c.deck_id == found.id, _RATES.c.prefix.in_(candidates)
                )
            ).all()
            if rows:
                row = max(rows, key=lambda r: len(r.prefix))
                return _rate_of(row)
    return None


# --- perimeter: IP allow-list, block thresholds, country lists, limit raises, audit log -------

#: Longest temporary limit raise, and longest timed IP block.
MAX_RAISE_SECONDS = 30 * 86_400
MAX_BLOCK_SECONDS = 365 * 86_400
#: Most audit events one ``list_audit_events`` returns.
MAX_AUDIT_ROWS = 10_000
_COUNTRY = re.compile(r"[A-Z]{2}")


@dataclass(frozen=True, slots=True)
class IpAllowInfo:
    #: ``None`` for a network no tenant ever blocks.
    tenant: str | None
    cidr: str
    note: str


@dataclass(frozen=True, slots=True)
class PerimeterInfo:
    """The perimeter settings of a tenant, or of one extension (no block thresholds there)."""

    tenant: str
    extension: str | None
    block_threshold: int | None
    block_seconds: int | None
    country_mode: CountryMode
    countries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RaiseInfo:
    id: int
    tenant: str
    #: ``None`` for a raise of the tenant's limit.
    extension: str | None
    daily_limit: int
    expires_at: datetime
    reason: str
    actor: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AuditInfo:
    id: int
    at: datetime
    kind: str
    reason: str
    tenant: str
    extension: str
    source_ip: str
    call_id: str
    actor: str
    detail: dict[str, Any]


def record_admin_event(
    engine: Engine,
    actor: str,
    kind: str,
    detail: dict[str, Any],
    *,
    tenant: str | None = None,
    extension: str | None = None,
) -> None:
    """Audit an admin change made outside SQL (IP blocks, threat lists in Redis): no version
    bump, since the snapshot does not hold them."""
    with session_scope(engine) as session:
        record_admin_change(session, actor, f"admin.{kind}", tenant, extension, detail)


def _ip_allow_rows(session: Session, tenant_id: int | None, cidr: str) -> list[IpAllow]:
    owner = IpAllow.tenant_id.is_(None) if tenant_id is None else IpAllow.tenant_id == tenant_id
    return list(session.scalars(sa.select(IpAllow).where(owner, IpAllow.cidr == cidr)))


def add_ip_allow(
    engine: Engine, cidr: str, *, actor: str, tenant: str | None = None, note: str = ""
) -> IpAllowInfo:
    """Never block ``cidr`` (the PBX itself, the office): for every tenant, or for one."""
    network = str(parse_cidr(cidr))
    note = _text("note", note, 255)
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        if _ip_allow_rows(session, tenant_id, network):
            raise ValidationError("cidr", f"{network} is on that allow-list already")
        session.add(IpAllow(tenant_id=tenant_id, cidr=network, note=note))
        _changed(session, actor, "ip_allow.add", {"cidr": network, "note": note}, tenant=tenant)
    return IpAllowInfo(tenant=tenant, cidr=network, note=note)


def remove_ip_allow(engine: Engine, cidr: str, *, actor: str, tenant: str | None = None) -> None:
    network = str(parse_cidr(cidr))
    with session_scope(engine) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        rows = _ip_allow_rows(session, tenant_id, network)
        if not rows:
            raise NotFoundError(f"{network} is not on that allow-list")
        for row in rows:
            session.delete(row)
        _changed(session, actor, "ip_allow.remove", {"cidr": network}, tenant=tenant)


def list_ip_allow(engine: Engine, *, tenant: str | None = None) -> list[IpAllowInfo]:
    """The tenant's allow-list, or the one of every tenant (``tenant=None``)."""
    with session_scope(engine, write=False) as session:
        tenant_id = None if tenant is None else _tenant(session, tenant).id
        owner = IpAllow.tenant_id.is_(None) if tenant_id is None else IpAllow.tenant_id == tenant_id
        query = sa.select(IpAllow.cidr, IpAllow.note).where(owner).order_by(IpAllow.id)
        return [IpAllowInfo(tenant, cidr, note) for cidr, note in session.execute(query)]


def parse_countries(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"gb, fr"`` or an iterable of codes → distinct ISO 3166 alpha-2 codes, sorted."""
    items = text.split(",") if isinstance(text, str) else list(text)
    codes = set()
    for item in items:
        code = item.strip().upper() if isinstance(item, str) else item
        if not code:
            continue
        if not isinstance(code, str) or not _COUNTRY.fullmatch(code):
            raise ValidationError("countries", f"invalid {item!r}: two-letter ISO codes like GB")
        codes.add(code)
    return tuple(sorted(codes))


def _perimeter_info(tenant: Tenant, extension: Extension | None) -> PerimeterInfo:
    owner: Tenant | Extension = tenant if extension is None else extension
    return PerimeterInfo(
        tenant=tenant.name,
        extension=None if extension is None else extension.name,
        block_threshold=tenant.block_threshold,
        block_seconds=tenant.block_seconds,
        country_mode=CountryMode(owner.country_mode),
        countries=parse_countries(owner.countries),
    )


def get_perimeter(engine: Engine, tenant: str, *, extension: str | None = None) -> PerimeterInfo:
    with session_scope(engine, write=False) as session:
        return _perimeter_info(*_scope(session, tenant, extension))


def set_block_policy(
    engine: Engine,
    tenant: str,
    *,
    actor: str,
    threshold: Keep[int | None] = UNSET,
    seconds: Keep[int | None] = UNSET,
) -> PerimeterInfo:
    """The tenant's refused attempts before an IP block and the block's length (``None``: the
    global settings; a threshold of 0 never blocks for this tenant's refusals)."""
    changes = _validated(
        {
            "block_threshold": lambda v: None if v is None else _bounded("threshold", v, 0, 10**6),
            "block_seconds": lambda v: (
                None if v is None else _bounded("seconds", v, 1, MAX_BLOCK_SECONDS)
            ),
        },
        {"block_threshold": threshold, "block_seconds": seconds},
    )
    if not changes:
        raise ValidationError("changes", "nothing to change")
    with session_scope(engine) as session:
        owner = _tenant(session, tenant)
        for key, value in changes.items():
            setattr(owner, key, value)
        _changed(session, actor, "tenant.block_policy", changes, tenant=tenant)
        return _perimeter_info(owner, None)


def set_countries(
    engine: Engine,
    tenant: str,
    mode: str,
    countries: str | Iterable[str] = (),
    *,
    actor: str,
    extension: str | None = None,
) -> PerimeterInfo:
    """Allow only (``allow``), refuse (``deny``) or stop checking (``off``) the source address's
    countries, for the tenant or one extension (both lists apply to an extension's calls)."""
    chosen = _enum("mode", CountryMode, mode)
    codes = parse_countries(countries)
    if chosen is CountryMode.OFF and codes:
        raise ValidationError("countries", "the off mode takes no countries")
    if chosen is CountryMode.DENY and not codes:
        raise ValidationError("countries", "the deny mode needs at least one country")
    with session_scope(engine) as session:
        owner, ext = _scope(session, tenant, extension)
        target: Tenant | Extension = owner if ext is None else ext
        target.country_mode, target.countries = chosen.value, ",".join(codes)
        detail = {"mode": chosen.value, "countries": list(codes)}
        _changed(session, actor, "countries.set", detail, tenant=tenant, extension=extension)
        return _perimeter_info(owner, ext)


def _raise_info(row: LimitRaise, tenant: str, extension: str | None) -> RaiseInfo:
    return RaiseInfo(
        id=row.id,
        tenant=tenant,
        extension=extension,
        daily_limit=row.daily_limit,
        expires_at=_aware(row.expires_at),
        reason=row.reason,
        actor=row.actor,
        created_at=_aware(row.created_at),
    )


def add_limit_raise(
    engine: Engine,
    tenant: str,
    daily_limit: int,
    seconds: int,
    *,
    actor: str,
    extension: str | None = None,
    reason: str = "",
) -> RaiseInfo:
    """Raise the daily limit of the tenant (or one extension) to ``daily_limit`` for ``seconds``;
    it lapses by itself (the snapshot is rebuilt when it ends). Only a real raise is accepted:
    above the current limit, which must exist."""
    limit = _amount("daily_limit", daily_limit)
    assert limit is not None
    length = _bounded("seconds", seconds, 60, MAX_RAISE_SECONDS)
    reason = _text("reason", reason, 255)
    with session_scope(engine) as session:
        owner, ext = _scope(session, tenant, extension)
        current = owner.daily_limit if ext is None else ext.daily_limit
        if current is None:
            raise ValidationError("daily_limit", "there is no daily limit to raise")
        if limit <= current:
            raise ValidationError(
                "daily_limit",
                f"{format_money(limit)} is not above the limit {format_money(current)}",
            )
        now = datetime.now(UTC)
        row = LimitRaise(
            tenant_id=owner.id,
            extension_id=None if ext is None else ext.id,
            daily_limit=limit,
            expires_at=datetime.fromtimestamp(now.timestamp() + length, UTC),
            reason=reason,
            actor=actor[:64],
            created_at=now,
        )
        session.add(row)
        session.flush()
        detail = {"id": row.id, "daily_limit": limit, "seconds": length, "reason": reason}
        _changed(session, actor, "limit.raise", detail, tenant=tenant, extension=extension)
        return _raise_info(row, tenant, extension)


def list_limit_raises(
    engine: Engine, *, tenant: str | None = None, include_expired: bool = False
) -> list[RaiseInfo]:
    """The raises in force (or every one kept), soonest end first."""
    with session_scope(engine, write=False) as session:
        query = (
            sa.select(LimitRaise, Tenant.name, Extension.name)
            .join(Tenant, LimitRaise.tenant_id == Tenant.id)
            .outerjoin(Extension, LimitRaise.extension_id == Extension.id)
            .order_by(LimitRaise.expires_at, LimitRaise.id)
        )
        if tenant is not None:
            query = query.where(LimitRaise.tenant_id == _tenant(session, tenant).id)
        if not include_expired:
            query = query.where(LimitRaise.expires_at > datetime.now(UTC))
        return [_raise_info(row, t, e) for row, t, e in session.execute(query)]


def cancel_limit_raise(engine: Engine, raise_id: int, *, actor: str) -> None:
    """End a raise now (it is deleted; the audit log keeps it)."""
    with session_scope(engine) as session:
        row = session.get(LimitRaise, raise_id)
        if row is None:
            raise NotFoundError(f"limit raise {raise_id} does not exist")
        tenant = session.get(Tenant, row.tenant_id)
        extension = None if row.extension_id is None else session.get(Extension, row.extension_id)
        session.delete(row)
        _changed(
            session,
            actor,
            "limit.cancel",
            {"id": raise_id},
            tenant=tenant.name if tenant is not None else None,
            extension=extension.name if extension is not None else None,
        )


def list_audit_events(
    engine: Engine,
    *,
    since: datetime | None = None,
    tenant: str | None = None,
    reason: str | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[AuditInfo]:
    """The newest audit events matching every given filter, newest first. ``kind`` matches
    exactly, or as a prefix when it ends with ``.`` or ``*`` (``admin.`` for every admin
    change)."""
    count = _bounded("limit", limit, 1, MAX_AUDIT_ROWS)
    query = sa.select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
    if since is not None:
        query = query.where(AuditEvent.at >= since.astimezone(UTC))
    if tenant is not None:
        query = query.where(AuditEvent.tenant == tenant)
    if reason is not None:
        query = query.where(AuditEvent.reason == reason)
    if kind is not None:
        stem = kind.rstrip("*")
        if stem != kind or kind.endswith("."):
            escaped = stem.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(AuditEvent.kind.like(escaped + "%", escape="\\"))
        else:
            query = query.where(AuditEvent.kind == kind)
    with session_scope(engine, write=False) as session:
        return [
            AuditInfo(
                id=row.id,
                at=_aware(row.at),
                kind=row.kind,
                reason=row.reason,
                tenant=row.tenant,
                extension=row.extension,
                source_ip=row.source_ip,
                call_id=row.call_id,
                actor=row.actor,
                detail=_detail(row.detail),
            )
            for row in session.scalars(query.limit(count))
        ]


def _detail(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}
