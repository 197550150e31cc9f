"""CDR replay: run real past calls through a policy before that policy can refuse a real call.

Three parts, used in this order by ``guard replay``:

1. ``read_cdr`` reads Asterisk's ``Master.csv`` (``cdr_csv``, no header) or a CSV with named
   columns into ``CdrCall`` values, and lists the rows it cannot use by line number.
2. ``load_policy``/``apply_policy`` read a proposed policy (TOML, or YAML when PyYAML is
   installed) and lay it over the current snapshot: tenant and extension limits, routing
   profiles, max call seconds, destination blocks and rate caps.
3. ``replay`` runs every call through the real ``Engine`` in time order, with the engine's clock
   set to each call's start (authorize) and end (settle), against a throw-away ledger the caller
   provides: never the live counters. Starts and ends are interleaved in one event queue, so
   concurrent-call limits see the calls that really overlapped. ``summarize`` turns the outcome
   into a ``ReplayReport``: refusals by reason with what they cost and the first call each reason
   stopped, calls cut short by the max duration, spend per day (actual and under the policy),
   refusals by hour and by destination class.

A replay never writes to the live log, the audit table or the live counters: its events are
dropped (a fail2ban filter must not ban addresses from last month's calls). Shadow mode is
ignored: a replay always judges as if the policy were enforced.

``cdr_csv`` column order (Asterisk's ``cdr_csv.c``, ``build_csv_record``), no header line::

    accountcode, src, dst, dcontext, clid, channel, dstchannel, lastapp, lastdata,
    start, answer, end, duration, billsec, disposition, amaflags
    [, uniqueid]                       (cdr.conf [csv] loguniqueid=yes)
    [, userfield]                      (loguserfield=yes)
    [, peeraccount, linkedid, sequence] (newcdrcolumns=yes)

so a row has 16 to 21 columns. With 17 or 20 columns either the uniqueid or the userfield is
present: a value shaped like a uniqueid (``1717588800.42``, optionally ``system-`` prefixed) is
taken as the uniqueid. Times are wall-clock ``YYYY-MM-DD HH:MM:SS`` in the zone Asterisk wrote
them in (local time, or UTC with ``usegmtime=yes``): the caller says which.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import importlib
import re
import tomllib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from guard.domain import CallAttempt, Decision, DestinationClass, Reason, UaLockMode
from guard.engine import Engine, EngineSettings, SnapshotHolder
from guard.errors import ConfigurationError, NotFoundError, ValidationError
from guard.events import Event, EventBus
from guard.ledger.protocol import Ledger
from guard.money import MAX_CALL_SECONDS, MAX_RATE, call_cost, parse_money
from guard.schedule import zone
from guard.snapshot import DestinationRule, ExtensionConfig, Snapshot, TenantConfig

#: The 16 columns every ``cdr_csv`` row starts with.
MASTER_COLUMNS: Final = (
    "accountcode",
    "src",
    "dst",
    "dcontext",
    "clid",
    "channel",
    "dstchannel",
    "lastapp",
    "lastdata",
    "start",
    "answer",
    "end",
    "duration",
    "billsec",
    "disposition",
    "amaflags",
)
#: Columns a CSV with a header must have (plus one of ``HEADER_EXTENSION``).
HEADER_REQUIRED: Final = ("start", "dst", "billsec")
#: Where a CSV with a header names the extension, in order of preference.
HEADER_EXTENSION: Final = ("extension", "channel", "src")
#: Longest call a CDR row may report (seconds): beyond a week it is a broken row, not a call.
MAX_CDR_SECONDS: Final = 7 * 86_400
#: The User-Agent of a replayed call when the CDR has none (matches no scanner pattern).
NEUTRAL_USER_AGENT: Final = "guard-replay"
#: The source address of a replayed call when the CDR has none and no network is configured
#: (TEST-NET-1, RFC 5737: no real host).
NEUTRAL_SOURCE_IP: Final = "192.0.2.1"
#: Pseudo-reason of the calls the policy allows but cuts short (their max duration).
CUT_SHORT: Final = "cut_short"

_MASTER_EXTRA = {
    0: (),
    2: ("uniqueid", "userfield"),
    3: ("peeraccount", "linkedid", "sequence"),
    5: ("uniqueid", "userfield", "peeraccount", "linkedid", "sequence"),
}
_UNIQUEID = re.compile(r"(?:[A-Za-z0-9_.-]+-)?[0-9]{6,}\.[0-9]+")
#: ``PJSIP/1001-0000000f``, ``SIP/1001-00000a3c``, ``IAX2/1001-00001234`` (Asterisk 12+: the
#: suffix is 8 hex digits). Trunks and ``Local/`` channels fall back to the ``src`` column.
_CHANNEL = re.compile(r"(?:PJSIP|SIP|IAX2)/(?P<name>.+)-[0-9A-Fa-f]{8}")
_EPOCH = re.compile(r"[0-9]{9,11}(?:\.[0-9]+)?")
_SECONDS = re.compile(r"[0-9]{1,9}")
_PREFIX = re.compile(r"[0-9]{1,32}")
_MAX_SHOWN = 40
#: Candidates for one character of a bracket expression (``[A-Z]``) in a User-Agent glob.
_PRINTABLE: Final = "".join(chr(code) for code in range(0x21, 0x7F))


# --- reading CDRs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CdrCall:
    """One call of a CDR file, as the replay needs it. Empty strings mean "not in the CDR"."""

    #: Line of the file where the row starts (1-based).
    line: int
    #: Epoch seconds.
    start: float
    extension: str
    number: str
    #: From the start to the hangup, ringing included (seconds).
    duration: int
    #: Answered seconds: what the call was billed for.
    billsec: int
    disposition: str = ""
    source_ip: str = ""
    user_agent: str = ""
    uniqueid: str = ""


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class CdrFile:
    """What ``read_cdr`` found: the usable calls sorted by start, and the rows it could not use."""

    #: ``master`` (cdr_csv order, no header) or ``header`` (named columns).
    layout: str
    calls: tuple[CdrCall, ...]
    bad_rows: tuple[BadRow, ...]
    #: Rows left out because their context was not asked for.
    skipped: int = 0


class _RowError(ValueError):
    """A row ``read_cdr`` cannot use; the message is shown with the line number."""


def _shown(text: str) -> str:
    return ascii(text[:_MAX_SHOWN]) + ("..." if len(text) > _MAX_SHOWN else "")


def _seconds(name: str, text: str) -> int:
    value = text.strip()
    if not _SECONDS.fullmatch(value) or int(value) > MAX_CDR_SECONDS:
        raise _RowError(
            f"{name} is not a number of seconds up to {MAX_CDR_SECONDS}: {_shown(text)}"
        )
    return int(value)


def _start(text: str, timezone: str) -> float:
    """Epoch seconds of a CDR time: epoch digits, or ISO 8601 (naive means ``timezone``)."""
    value = text.strip()
    if not value:
        raise _RowError("start is empty")
    if _EPOCH.fullmatch(value):
        return float(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _RowError(f"start is not a time (YYYY-MM-DD HH:MM:SS): {_shown(text)}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone(timezone))
    return moment.timestamp()


def extension_of(channel: str, src: str = "") -> str:
    """The endpoint in a channel name (``PJSIP/1001-0000000f`` → ``1001``), else ``src``."""
    match = _CHANNEL.fullmatch(channel.strip())
    return match["name"] if match else src.strip()


def _call(
    line: int,
    cells: Mapping[str, str],
    timezone: str,
) -> CdrCall:
    extension = cells.get("extension", "").strip() or extension_of(
        cells.get("channel", ""), cells.get("src", "")
    )
    if not extension:
        raise _RowError("no extension: the channel names no endpoint and src is empty")
    number = cells["dst"].strip()
    if not number:
        raise _RowError("dst is empty")
    billsec = _seconds("billsec", cells["billsec"])
    duration_text = cells.get("duration", "").strip()
    duration = _seconds("duration", duration_text) if duration_text else billsec
    return CdrCall(
        line=line,
        start=_start(cells["start"], timezone),
        extension=extension,
        number=number,
        duration=max(duration, billsec),
        billsec=billsec,
        disposition=cells.get("disposition", "").strip(),
        source_ip=cells.get("source_ip", "").strip(),
        user_agent=cells.get("user_agent", ""),
        uniqueid=cells.get("uniqueid", "").strip(),
    )


def _master_cells(fields: list[str]) -> dict[str, str]:
    """The named cells of a ``cdr_csv`` row (see the module docstring for the column order)."""
    extra = len(fields) - len(MASTER_COLUMNS)
    names: tuple[str, ...]
    if extra in _MASTER_EXTRA:
        names = _MASTER_EXTRA[extra]
    elif extra in (1, 4):
        first = "uniqueid" if _UNIQUEID.fullmatch(fields[16].strip()) else "userfield"
        names = (first, *_MASTER_EXTRA[3][: extra - 1])
    else:
        raise _RowError(f"{len(fields)} columns: a cdr_csv row has 16 to 21")
    return dict(zip(MASTER_COLUMNS + names, fields, strict=True))


def _header(fields: list[str]) -> dict[str, int] | None:
    """Column name → index when ``fields`` is a header line, else ``None``."""
    names = [field.strip().lower() for field in fields]
    if not set(HEADER_REQUIRED) <= set(names) or not set(HEADER_EXTENSION) & set(names):
        return None
    return {name: index for index, name in reversed(list(enumerate(names)))}


def read_cdr(lines: Iterable[str], *, timezone: str, contexts: Collection[str] = ()) -> CdrFile:
    """Read a ``cdr_csv`` file or a CSV with a header line (see the module docstring).

    A CSV with a header must name the columns ``start``, ``dst``, ``billsec`` and one of
    ``extension``, ``channel`` or ``src``; ``duration``, ``disposition``, ``source_ip``,
    ``user_agent``, ``uniqueid`` and ``dcontext`` are read when present, other columns ignored.
    ``timezone`` is the zone of wall-clock times without an offset. When ``contexts`` is given,
    only rows whose ``dcontext`` is one of them are kept (the outbound contexts: inbound calls
    are not Guard's business). Rows that cannot be used are listed, not raised.
    """
    zone(timezone)
    reader = csv.reader(lines)
    header: dict[str, int] | None = None
    calls: list[CdrCall] = []
    bad: list[BadRow] = []
    skipped = 0
    wanted = frozenset(contexts)
    first = True
    line = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad.append(BadRow(line, f"not CSV: {exc}"))
            line = reader.line_num + 1
            continue
        row_line, line = line, reader.line_num + 1
        if not any(field.strip() for field in fields):
            continue
        if first:
            first = False
            header = _header(fields)
            if header is not None:
                continue
        try:
            if header is None:
                cells = _master_cells(fields)
            elif len(fields) <= max(header.values()):
                raise _RowError(f"{len(fields)} columns, the header names more")
            else:
                cells = {name: fields[index] for name, index in header.items()}
            if wanted and cells.get("dcontext", "").strip() not in wanted:
                skipped += 1
                continue
            calls.append(_call(row_line, cells, timezone))
        except _RowError as exc:
            bad.append(BadRow(row_line, str(exc)))
    calls.sort(key=lambda call: (call.start, call.line))
    return CdrFile("master" if header is None else "header", tuple(calls), tuple(bad), skipped)


# --- the proposed policy ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """A proposed policy for one tenant: only what it names changes (see ``load_policy``).

    ``tenant``, ``all_extensions`` and ``extensions`` hold validated field values of
    ``TenantConfig``/``ExtensionConfig`` (``profile`` is a profile name); ``None`` rule tuples
    keep the tenant's current rules of that kind.
    """

    source: str
    tenant: Mapping[str, Any]
    all_extensions: Mapping[str, Any]
    extensions: Mapping[str, Mapping[str, Any]]
    profiles: Mapping[str, frozenset[DestinationClass]]
    rate_caps: tuple[DestinationRule, ...] | None = None
    blocked: tuple[DestinationRule, ...] | None = None


_NO_LIMIT = frozenset({"none", "unlimited"})
_TOP_KEYS = frozenset(
    {"tenant", "all_extensions", "extensions", "profiles", "rate_caps", "blocked"}
)
_TENANT_KEYS = frozenset({"daily_limit", "concurrent_limit", "max_call_seconds"})
_EXTENSION_KEYS = frozenset({"daily_limit", "concurrent_limit", "profile"})
_MAX_CONCURRENT = 100_000


def _table(where: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(where, "must be a table")
    return value


def _keys(where: str, table: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(str(key) for key in table if key not in allowed)
    if unknown:
        raise ValidationError(
            where, f"unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}"
        )


def _amount(where: str, value: object, *, allow_none: bool) -> int | None:
    """A decimal amount (``50``, ``12.5``, ``"0.0125"``) in sub-units, or ``None`` for "none"."""
    if isinstance(value, str) and value.strip().lower() in _NO_LIMIT:
        if allow_none:
            return None
        raise ValidationError(where, "must be an amount")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValidationError(where, f"must be a decimal amount{' or none' * allow_none}")
    return parse_money(value if isinstance(value, str) else repr(value), where)


def _count(where: str, value: object, low: int, high: int, *, allow_none: bool) -> int | None:
    if allow_none and isinstance(value, str) and value.strip().lower() in _NO_LIMIT:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        also = " or none" if allow_none else ""
        raise ValidationError(where, f"must be a whole number from {low} to {high}{also}")
    return value


def _classes(where: str, value: object) -> frozenset[DestinationClass]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError(where, "must be a list of destination classes")
    try:
        return frozenset(DestinationClass(item.strip().lower()) for item in value)
    except ValueError:
        choices = ", ".join(member.value for member in DestinationClass)
        raise ValidationError(where, f"unknown class; use {choices}") from None


def _limits(where: str, table: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    _keys(where, table, allowed)
    fields: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{where}.{key}"
        if key == "daily_limit":
            fields[key] = _amount(at, value, allow_none=True)
        elif key == "concurrent_limit":
            fields[key] = _count(at, value, 0, _MAX_CONCURRENT, allow_none=True)
        elif key == "max_call_seconds":
            fields[key] = _count(at, value, 1, MAX_CALL_SECONDS, allow_none=False)
        elif not isinstance(value, str) or not value.strip():
            raise ValidationError(at, "must be a profile name")
        else:
            fields[key] = value.strip()
    return fields


def _rules(where: str, value: object, *, capped: bool) -> tuple[DestinationRule, ...]:
    if not isinstance(value, list):
        raise ValidationError(where, "must be a list of tables ([[...]] in TOML)")
    rules = []
    allowed = frozenset({"prefix", "class", "max_rate"} if capped else {"prefix", "class"})
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        table = _table(at, item)
        _keys(at, table, allowed)
        prefix = table.get("prefix")
        if prefix is not None and (not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix)):
            raise ValidationError(f"{at}.prefix", "must be a string of 1 to 32 digits")
        dest_class = None
        if "class" in table:
            (dest_class,) = _classes(f"{at}.class", [table["class"]])
        if prefix is None and dest_class is None:
            raise ValidationError(at, "needs a prefix, a class or both")
        max_rate = None
        if capped:
            if "max_rate" not in table:
                raise ValidationError(at, "needs max_rate (the highest rate per minute allowed)")
            max_rate = _amount(f"{at}.max_rate", table["max_rate"], allow_none=False)
            if max_rate is not None and max_rate > MAX_RATE:
                raise ValidationError(f"{at}.max_rate", "is above the highest possible rate")
        rules.append(DestinationRule(prefix=prefix, dest_class=dest_class, max_rate=max_rate))
    return tuple(rules)


def parse_policy(data: Mapping[str, Any], source: str = "policy") -> PolicyFile:
    """Validate a policy document (see ``load_policy``); ``ValidationError`` names the key."""
    _keys(source, data, _TOP_KEYS)
    extensions = _table(f"{source}: extensions", data.get("extensions", {}))
    profiles = _table(f"{source}: profiles", data.get("profiles", {}))
    return PolicyFile(
        source=source,
        tenant=_limits(
            f"{source}: tenant", _table(f"{source}: tenant", data.get("tenant", {})), _TENANT_KEYS
        ),
        all_extensions=_limits(
            f"{source}: all_extensions",
            _table(f"{source}: all_extensions", data.get("all_extensions", {})),
            _EXTENSION_KEYS,
        ),
        extensions={
            str(name): _limits(
                f"{source}: extensions.{name}",
                _table(f"{source}: extensions.{name}", table),
                _EXTENSION_KEYS,
            )
            for name, table in extensions.items()
        },
        profiles={
            str(name): _classes(f"{source}: profiles.{name}", classes)
            for name, classes in profiles.items()
        },
        rate_caps=(
            _rules(f"{source}: rate_caps", data["rate_caps"], capped=True)
            if "rate_caps" in data
            else None
        ),
        blocked=(
            _rules(f"{source}: blocked", data["blocked"], capped=False)
            if "blocked" in data
            else None
        ),
    )


def load_policy(path: Path) -> PolicyFile:
    """Read a policy file: TOML, or YAML (``.yaml``/``.yml``) when PyYAML is installed.

    Every key is optional; what is not named keeps its current value::

        [tenant]                  # daily_limit, concurrent_limit, max_call_seconds
        [all_extensions]          # daily_limit, concurrent_limit, profile: every extension
        [extensions."1001"]       # the same for one extension (added if it does not exist)
        [profiles]                # name = [classes]: defines or redefines routing profiles
        [[rate_caps]]             # prefix and/or class, max_rate: replaces the tenant's caps
        [[blocked]]               # prefix and/or class: replaces the tenant's blocked rules

    Amounts are decimals of the tenant's currency; ``"none"`` means no limit.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"policy file {path}: {exc.strerror}") from None
    source = str(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            yaml = importlib.import_module("yaml")
        except ModuleNotFoundError:
            raise ConfigurationError(
                f"policy file {path}: YAML needs PyYAML (pip install pyyaml); or write TOML"
            ) from None
        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as exc:
            raise ValidationError(source, f"not valid YAML: {exc}") from None
    else:
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValidationError(source, f"not valid TOML: {exc}") from None
    return parse_policy(_table(source, data), source)


def _profile_classes(
    snapshot: Snapshot, tenant: str, known: Mapping[str, frozenset[DestinationClass]]
) -> dict[str, frozenset[DestinationClass]]:
    """Profile name → classes, as the tenant's extensions use them, then ``known`` over them."""
    found = {
        ext.profile: ext.allowed_classes
        for (owner, _), ext in snapshot.extensions.items()
        if owner == tenant
    }
    found.update(known)
    return found


def apply_policy(
    snapshot: Snapshot,
    tenant: str,
    policy: PolicyFile,
    known_profiles: Mapping[str, frozenset[DestinationClass]] | None = None,
) -> Snapshot:
    """``snapshot`` with ``policy`` laid over ``tenant``: only what the policy names changes.

    ``known_profiles`` are the routing profiles the tenant may use (its own, then the global
    ones); the policy's own ``profiles`` win over them. An extension whose profile is redefined
    gets the new classes. Extensions named by the policy but missing are added.
    """
    current = snapshot.tenant(tenant)
    if current is None:
        raise NotFoundError(f"tenant {tenant!r} does not exist: a policy changes an existing one")
    profiles = _profile_classes(snapshot, tenant, known_profiles or {})
    profiles.update(policy.profiles)

    def classes(name: str) -> frozenset[DestinationClass]:
        found = profiles.get(name)
        if found is None:
            raise ValidationError(
                f"{policy.source}: profile", f"routing profile {name!r} is not known"
            )
        return found

    rules = current.rules
    if policy.rate_caps is not None:
        rules = tuple(rule for rule in rules if rule.max_rate is None) + policy.rate_caps
    if policy.blocked is not None:
        rules = tuple(rule for rule in rules if rule.max_rate is not None) + policy.blocked
    extensions = dict(snapshot.extensions)
    for (owner, name), ext in snapshot.extensions.items():
        if owner != tenant:
            continue
        changes = {**policy.all_extensions, **policy.extensions.get(name, {})}
        profile = changes.pop("profile", ext.profile)
        allowed = (
            classes(profile)
            if profile != ext.profile or profile in policy.profiles
            else ext.allowed_classes
        )
        extensions[owner, name] = dataclasses.replace(
            ext, profile=profile, allowed_classes=allowed, **changes
        )
    for name, own in policy.extensions.items():
        if (tenant, name) not in extensions:
            changes = {**policy.all_extensions, **own}
            profile = changes.pop("profile", "domestic")
            extensions[tenant, name] = ExtensionConfig(
                tenant=tenant,
                name=name,
                profile=profile,
                allowed_classes=classes(profile),
                **changes,
            )
    return dataclasses.replace(
        snapshot,
        tenants=MappingProxyType(
            {
                **snapshot.tenants,
                tenant: dataclasses.replace(current, rules=rules, **policy.tenant),
            }
        ),
        extensions=MappingProxyType(extensions),
    )


# --- replaying ----------------------------------------------------------------------------------


def _glob_example(pattern: str) -> str:
    """A string that ``fnmatchcase`` matches against ``pattern`` (a pinned User-Agent glob)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            continue
        if char == "?":
            out.append("x")
            continue
        if char == "[":
            j = i + (i < n and pattern[i] == "!")
            j += j < n and pattern[j] == "]"
            end = pattern.find("]", j)
            if end != -1:
                bracket = pattern[i - 1 : end + 1]
                out.append(next((c for c in _PRINTABLE if fnmatchcase(c, bracket)), "x"))
                i = end + 1
                continue
        out.append(char)
    return "".join(out)


def neutral_user_agent(extension: ExtensionConfig | None) -> str:
    """A User-Agent the extension's lock accepts, for a CDR row without one."""
    if extension is None or extension.ua_mode is UaLockMode.OFF or not extension.ua_value:
        return NEUTRAL_USER_AGENT
    if extension.ua_mode is UaLockMode.LEARN:
        return extension.ua_value
    return _glob_example(extension.ua_value)


def neutral_source_ip(tenant: TenantConfig | None, extension: ExtensionConfig | None) -> str:
    """An address inside the extension's and the tenant's networks, for a CDR row without one.

    When no address satisfies both (disjoint networks) the first candidate is returned, and the
    call is refused as it would be for any address.
    """
    scopes = [
        networks
        for networks in (extension.networks if extension else (), tenant.networks if tenant else ())
        if networks
    ]
    candidates = [network.network_address for networks in scopes for network in networks]
    for address in candidates:
        if all(any(address in network for network in networks) for networks in scopes):
            return str(address)
    return str(candidates[0]) if candidates else NEUTRAL_SOURCE_IP


class _ReplayClock:
    """The engine's clock during a replay: the time of the event being replayed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _DiscardedEvents(EventBus):
    """An event bus that drops everything: a replay must not log, alert or audit history."""

    def emit(self, event: Event) -> None:
        """Drop ``event``; the replay reads the decisions, not the events."""


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """One replayed call: what the policy decided and what the call cost, really and under it."""

    call: CdrCall
    decision: Decision
    #: The call as it happened, at the replay's rates; ``None`` when it has no rate.
    actual_cost: int | None
    #: Under the policy: 0 when refused, else the cost of the call, cut at its max duration.
    policy_cost: int
    #: Answered seconds the policy's max duration would have cut off.
    cut_seconds: int
    #: The CDR had no source IP or User-Agent: a neutral value that passes was used.
    neutral: bool

    @property
    def refused(self) -> bool:
        return not self.decision.allowed


def _start_order(index: int, call: CdrCall) -> tuple[float, int, int]:
    return (call.start, 1, index)


def enforced(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` with shadow mode off everywhere: a replay judges as if enforcing."""
    tenants = {
        name: dataclasses.replace(tenant, shadow=False) if tenant.shadow else tenant
        for name, tenant in snapshot.tenants.items()
    }
    extensions = {
        key: dataclasses.replace(ext, shadow=False) if ext.shadow else ext
        for key, ext in snapshot.extensions.items()
    }
    return dataclasses.replace(
        snapshot, tenants=MappingProxyType(tenants), extensions=MappingProxyType(extensions)
    )


async def replay(
    calls: Sequence[CdrCall],
    snapshot: Snapshot,
    tenant: str,
    ledger: Ledger,
    settings: EngineSettings | None = None,
) -> list[CallOutcome]:
    """Authorize and settle every call of ``tenant`` in time order on ``ledger`` (throw-away!).

    Each call is authorized at its start; an allowed call ends after its ringing time plus its
    answered time cut at the decision's ``max_seconds`` (as ``Dial(…,L())`` would cut it) and is
    settled then. Ends sort before starts at the same second, so a slot freed at 12:00:00 is free
    for a call starting at 12:00:00. Emergency calls hold no reservation and are not settled.
    Shadow mode is ignored (``enforced``).
    """
    snapshot = enforced(snapshot)
    clock = _ReplayClock()
    engine = Engine(
        SnapshotHolder(snapshot), ledger, _DiscardedEvents(), settings or EngineSettings(), clock
    )
    tenant_config = snapshot.tenant(tenant)
    queue = [_start_order(index, call) for index, call in enumerate(calls)]
    heapq.heapify(queue)
    decisions: dict[int, Decision] = {}
    talk: dict[int, int] = {}
    settled: dict[int, int] = {}
    neutral: set[int] = set()
    while queue:
        at, is_start, index = heapq.heappop(queue)
        clock.now = at
        call = calls[index]
        if not is_start:
            result = await engine.settle(tenant, f"replay-{call.line}", talk[index])
            settled[index] = result.cost
            continue
        extension = snapshot.extension(tenant, call.extension)
        if not call.source_ip or not call.user_agent:
            neutral.add(index)
        attempt = CallAttempt(
            tenant=tenant,
            extension=call.extension,
            number=call.number,
            source_ip=call.source_ip or neutral_source_ip(tenant_config, extension),
            user_agent=call.user_agent or neutral_user_agent(extension),
            call_id=f"replay-{call.line}",
            linked_id=call.uniqueid,
        )
        decision = decisions[index] = await engine.authorize(attempt)
        if decision.allowed:
            talk[index] = min(call.billsec, decision.max_seconds)
            if decision.reason is Reason.ALLOWED:
                ringing = call.duration - call.billsec
                heapq.heappush(queue, (at + ringing + talk[index], 0, index))
    await engine.drain()
    outcomes = []
    for index, call in enumerate(calls):
        decision = decisions[index]
        rate = decision.destination
        spoken = talk.get(index, 0)
        if index in settled:
            policy_cost = settled[index]
        else:
            policy_cost = call_cost(rate, spoken) if rate is not None and spoken else 0
        outcomes.append(
            CallOutcome(
                call=call,
                decision=decision,
                actual_cost=None if rate is None else call_cost(rate, call.billsec),
                policy_cost=policy_cost,
                cut_seconds=call.billsec - spoken if decision.allowed else 0,
                neutral=index in neutral,
            )
        )
    return outcomes


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tally:
    """Calls of one group and what they really cost (unrated calls are counted, not priced)."""

    calls: int = 0
    cost: int = 0
    unrated: int = 0

    def add(self, cost: int | None) -> Tally:
        if cost is None:
            return Tally(self.calls + 1, self.cost, self.unrated + 1)
        return Tally(self.calls + 1, self.cost + cost, self.unrated)


@dataclass(frozen=True, slots=True)
class ReasonTally:
    """The calls one reason would have refused (or ``cut_short`` would have shortened).

    ``tally.cost`` is what those calls really cost: the money the limit would have saved if they
    were fraud, or the calls it would have stopped if they were normal traffic. For
    ``cut_short`` it is the money of the seconds cut off.
    """

    reason: str
    tally: Tally
    first: CallOutcome


@dataclass(frozen=True, slots=True)
class DayTally:
    """One of the tenant's days (``YYYY-MM-DD``, its time zone): spend as it was and under it."""

    day: str
    calls: int
    refused: int
    actual: int
    under_policy: int


@dataclass(frozen=True, slots=True)
class ReplayReport:
    tenant: str
    timezone: str
    currency: str
    outcomes: tuple[CallOutcome, ...]
    #: Refusal reasons, the costliest first.
    reasons: tuple[ReasonTally, ...]
    cut_short: ReasonTally | None
    days: tuple[DayTally, ...]
    #: Refused calls by hour of the tenant's clock (0-23), hours without refusals left out.
    refused_by_hour: tuple[tuple[int, Tally], ...]
    #: Refused calls by destination class (``unrated`` when the number has no rate).
    refused_by_class: tuple[tuple[str, Tally], ...]

    @property
    def calls(self) -> int:
        return len(self.outcomes)

    @property
    def refused(self) -> int:
        return sum(outcome.refused for outcome in self.outcomes)

    @property
    def actual(self) -> int:
        """What the calls really cost (rated calls only)."""
        return sum(outcome.actual_cost or 0 for outcome in self.outcomes)

    @property
    def under_policy(self) -> int:
        return sum(outcome.policy_cost for outcome in self.outcomes)

    @property
    def unrated(self) -> int:
        return sum(outcome.actual_cost is None for outcome in self.outcomes)

    @property
    def neutral(self) -> int:
        return sum(outcome.neutral for outcome in self.outcomes)


def summarize(
    outcomes: Sequence[CallOutcome], tenant: str, config: TenantConfig | None
) -> ReplayReport:
    """Group the outcomes of ``replay`` (in replay order) into a ``ReplayReport``."""
    timezone = config.timezone if config is not None else "UTC"
    where = zone(timezone)
    reasons: dict[str, Tally] = {}
    firsts: dict[str, CallOutcome] = {}
    cut = Tally()
    first_cut: CallOutcome | None = None
    days: dict[str, list[int]] = {}
    hours: dict[int, Tally] = {}
    classes: dict[str, Tally] = {}
    for outcome in outcomes:
        local = datetime.fromtimestamp(outcome.call.start, where)
        day = days.setdefault(local.strftime("%Y-%m-%d"), [0, 0, 0, 0])
        day[0] += 1
        day[2] += outcome.actual_cost or 0
        day[3] += outcome.policy_cost
        cost = outcome.actual_cost
        if outcome.refused:
            day[1] += 1
            reason = outcome.decision.reason.value
            reasons[reason] = reasons.get(reason, Tally()).add(cost)
            firsts.setdefault(reason, outcome)
            hours[local.hour] = hours.get(local.hour, Tally()).add(cost)
            rate = outcome.decision.destination
            name = rate.dest_class.value if rate is not None else "unrated"
            classes[name] = classes.get(name, Tally()).add(cost)
        elif outcome.cut_seconds:
            cut = cut.add((cost or 0) - outcome.policy_cost)
            first_cut = first_cut or outcome
    ranked = sorted(reasons.items(), key=lambda item: (-item[1].cost, -item[1].calls, item[0]))
    return ReplayReport(
        tenant=tenant,
        timezone=timezone,
        currency=config.currency if config is not None else "",
        outcomes=tuple(outcomes),
        reasons=tuple(ReasonTally(reason, tally, firsts[reason]) for reason, tally in ranked),
        cut_short=None if first_cut is None else ReasonTally(CUT_SHORT, cut, first_cut),
        days=tuple(DayTally(day, *values) for day, values in sorted(days.items())),
        refused_by_hour=tuple(sorted(hours.items())),
        refused_by_class=tuple(
            sorted(classes.items(), key=lambda item: (-item[1].cost, -item[1].calls, item[0]))
        ),
    )
