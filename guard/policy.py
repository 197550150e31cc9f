"""Policy: the pure checks that decide whether a call attempt may go on to the ledger.

``evaluate`` resolves what the checks need once (tenant, extension, normalized number, rate,
source address) into a ``CheckContext`` and runs the checks in a fixed order. The first failure is
the refusal reason; every outcome that can still be computed after it is kept too, for
``guard check`` and the audit trail. A check returns ``None`` when an input it needs is missing
(an unknown extension, an invalid number), so it is left out rather than guessed.
Emergency numbers pass every check, whatever the tenant, extension or caller.

No I/O here, and nothing that knows about Redis, SQL or Asterisk. Checks are cheap (no regex, no
exceptions on the allowed path, parsed values cached): they run for every call, before the one
Redis round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

from guard.domain import CallAttempt, CheckOutcome, Rate, Reason, UaLockMode
from guard.errors import ConfigurationError, ValidationError
from guard.money import format_money
from guard.rating import (
    NormalizedNumber,
    emergency_rate,
    is_emergency_number,
    normalize_number,
    rate_number,
)
from guard.schedule import local_time, within_windows
from guard.snapshot import (
    DestinationRule,
    ExtensionConfig,
    IPNetwork,
    Snapshot,
    TenantConfig,
)

IPAddress = IPv4Address | IPv6Address

#: Longest source address text worth parsing (an IPv6 address with a zone and a port fits).
_MAX_IP_TEXT = 96
#: Most characters of an untrusted value (and of its escaped form) quoted in a check's detail.
_MAX_SHOWN = 64


class CheckContext(NamedTuple):
    """One call attempt and everything resolved from it once, as the checks read it.

    ``extension``, ``number``, ``rate`` and ``source_ip`` are ``None`` when unknown, invalid,
    unrated or unparsable; the check that reports that has already failed. A named tuple, not a
    frozen dataclass: it is built for every call and is five times cheaper to build.
    """

    snapshot: Snapshot
    attempt: CallAttempt
    now: datetime
    tenant: TenantConfig
    extension: ExtensionConfig | None
    number: NormalizedNumber | None
    rate: Rate | None
    source_ip: IPAddress | None


#: A policy check: an outcome, or ``None`` when an input it needs is missing.
Check = Callable[[CheckContext], CheckOutcome | None]


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """The verdict of every check on one call attempt.

    ``reason`` is the first failure, or ``None`` when every check passed (always ``None`` for an
    emergency number). ``outcomes`` holds every check that could be computed, in order.
    """

    reason: Reason | None
    outcomes: tuple[CheckOutcome, ...]
    tenant: TenantConfig | None = None
    extension: ExtensionConfig | None = None
    number: NormalizedNumber | None = None
    rate: Rate | None = None
    is_emergency: bool = False
    #: The parsed source address (port stripped), or ``None`` when missing or unparsable.
    source_ip: IPAddress | None = None

    @property
    def passed(self) -> bool:
        return self.reason is None


def _show(value: str) -> str:
    """An untrusted value as it may appear in a detail: ASCII-escaped, quoted and truncated."""
    shown = ascii(value[:_MAX_SHOWN])
    if len(value) <= _MAX_SHOWN and len(shown) <= _MAX_SHOWN + 2:
        return shown
    return f"{shown[:_MAX_SHOWN]}... ({len(value)} characters)"


def _failed(name: str, reason: Reason, detail: str) -> CheckOutcome:
    return CheckOutcome(name, False, reason, detail)


#: Passed outcomes are shared constants: the allowed path allocates and formats nothing. What was
#: checked against (tenant, extension, number, rate) is in the ``PolicyResult`` itself.
_TENANT_OK = CheckOutcome("tenant", True)
_NUMBER_OK = CheckOutcome("number", True)
_EXTENSION_OK = CheckOutcome("extension", True)
_SCANNER_OK = CheckOutcome("scanner", True)
_UA_OFF = CheckOutcome("user_agent", True, None, "no User-Agent lock")
_UA_PINNED = CheckOutcome("user_agent", True, None, "matches the pinned pattern")
_UA_LEARNED = CheckOutcome("user_agent", True, None, "matches the learned User-Agent")
_UA_WILL_LEARN = CheckOutcome("user_agent", True, None, "nothing learned yet: will learn it")
_SOURCE_IP_OK = CheckOutcome("source_ip", True)
_NO_WINDOWS = CheckOutcome("time_window", True, None, "no time windows")
_IN_WINDOWS = CheckOutcome("time_window", True, None, "inside the time windows")
_RATE_OK = CheckOutcome("rate", True)
_DESTINATION_OK = CheckOutcome("destination", True)
_CLASS_OK = CheckOutcome("class", True)
_RATE_CAP_OK = CheckOutcome("rate_cap", True)


@lru_cache(maxsize=4096)
def parse_source_ip(text: str) -> IPAddress | None:
    """The address in ``text``, or ``None`` if it is not one.

    Accepts a bare IPv4/IPv6 address (with an optional zone), ``a.b.c.d:port`` and
    ``[v6]:port`` (as chan_pjsip's ``remote_addr`` gives it). An IPv4-mapped IPv6 address becomes
    the IPv4 address, so IPv4 networks match it.
    """
    if len(text) > _MAX_IP_TEXT:
        return None
    host, port = text, None
    bracketed = text.startswith("[")
    if bracketed:
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and rest[0] != ":"):
            return None
        if rest:
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return None
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if bracketed and not isinstance(address, IPv6Address):
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=16)
def _lowered(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Scanner patterns lower-cased once per pattern set; empty patterns would match everything."""
    return tuple(dict.fromkeys(p.lower() for p in patterns if p))


def _rules(ctx: CheckContext) -> tuple[DestinationRule, ...]:
    """The tenant's destination rules, then the global ones."""
    global_rules = ctx.snapshot.global_rules
    return ctx.tenant.rules + global_rules if global_rules else ctx.tenant.rules


def _rule_matches(rule: DestinationRule, e164: str, rate: Rate) -> bool:
    return (rule.prefix is None or e164.startswith(rule.prefix)) and (
        rule.dest_class is None or rule.dest_class is rate.dest_class
    )


def _describe_rule(rule: DestinationRule) -> str:
    parts = []
    if rule.prefix is not None:
        parts.append(f"prefix {rule.prefix}")
    if rule.dest_class is not None:
        parts.append(f"class {rule.dest_class}")
    return "rule " + (" and ".join(parts) if parts else "matching every destination")


def check_extension(ctx: CheckContext) -> CheckOutcome:
    """The extension exists in the tenant and is not locked."""
    ext = ctx.extension
    if ext is None:
        return _failed(
            "extension",
            Reason.UNKNOWN_EXTENSION,
            f"no extension {_show(ctx.attempt.extension)} in tenant {ctx.tenant.name}",
        )
    if ext.locked:
        return _failed(
            "extension", Reason.EXTENSION_LOCKED, f"locked: {ext.lock_reason or 'no reason given'}"
        )
    return _EXTENSION_OK


def check_scanner(ctx: CheckContext) -> CheckOutcome:
    """The User-Agent contains none of the known SIP scanner fragments (case-insensitive)."""
    user_agent = ctx.attempt.user_agent.lower()
    for pattern in _lowered(ctx.snapshot.scanner_patterns):
        if pattern in user_agent:
            return _failed(
                "scanner",
                Reason.SCANNER_USER_AGENT,
                f"User-Agent {_show(ctx.attempt.user_agent)} matches scanner pattern {pattern!r}",
            )
    return _SCANNER_OK


def check_user_agent(ctx: CheckContext) -> CheckOutcome | None:
    """The User-Agent lock: ``pin`` matches a glob, ``learn`` equals the learned value."""
    ext = ctx.extension
    if ext is None:
        return None
    user_agent = ctx.attempt.user_agent
    if ext.ua_mode is UaLockMode.PIN:
        if not ext.ua_value:
            return _failed("user_agent", Reason.USER_AGENT_MISMATCH, "pin mode without a pattern")
        if fnmatchcase(user_agent, ext.ua_value):
            return _UA_PINNED
        return _failed(
            "user_agent",
            Reason.USER_AGENT_MISMATCH,
            f"User-Agent {_show(user_agent)} does not match pinned {ext.ua_value!r}",
        )
    if ext.ua_mode is UaLockMode.LEARN:
        if ext.ua_value is None:
            return _UA_WILL_LEARN
        if user_agent != ext.ua_value:
            return _failed(
                "user_agent",
                Reason.USER_AGENT_MISMATCH,
                f"User-Agent {_show(user_agent)} differs from learned {_show(ext.ua_value)}",
            )
        return _UA_LEARNED
    return _UA_OFF


def _inside(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)


def check_source_ip(ctx: CheckContext) -> CheckOutcome | None:
    """The source address is inside the extension's and the tenant's networks (where set)."""
    ext = ctx.extension
    if ext is None:
        return None
    address = ctx.source_ip
    if address is None:
        return _failed(
            "source_ip",
            Reason.SOURCE_IP_NOT_ALLOWED,
            f"not an IP address: {_show(ctx.attempt.source_ip)}",
        )
    if ext.networks and not _inside(address, ext.networks):
        return _failed(
            "source_ip",
            Reason.SOURCE_IP_NOT_ALLOWED,
            f"{address} is outside the extension's networks",
        )
    if ctx.tenant.networks and not _inside(address, ctx.tenant.networks):
        return _failed(
            "source_ip", Reason.SOURCE_IP_NOT_ALLOWED, f"{address} is outside the tenant's networks"
        )
    return _SOURCE_IP_OK


def check_time_window(ctx: CheckContext) -> CheckOutcome | None:
    """Now, in the tenant's time zone, is inside the extension's and the tenant's windows."""
    ext = ctx.extension
    if ext is None:
        return None
    tenant = ctx.tenant
    if not ext.windows and not tenant.windows:
        return _NO_WINDOWS
    try:
        local = local_time(tenant.timezone, ctx.now)
    except ConfigurationError as exc:
        return _failed("time_window", Reason.OUTSIDE_TIME_WINDOW, str(exc))
    if not within_windows(ext.windows, local):
        whose = "extension's"
    elif not within_windows(tenant.windows, local):
        whose = "tenant's"
    else:
        return _IN_WINDOWS
    return _failed(
        "time_window",
        Reason.OUTSIDE_TIME_WINDOW,
        f"{local:%a %H:%M} {tenant.timezone} is outside the {whose} windows",
    )


def check_rate(ctx: CheckContext) -> CheckOutcome | None:
    """The normalized number has a rate (tenant deck, then global deck)."""
    if ctx.number is None:
        return None
    rate = ctx.rate
    if rate is None:
        return _failed("rate", Reason.NO_RATE, f"no rate for {ctx.number.e164}")
    return _RATE_OK


def check_destination(ctx: CheckContext) -> CheckOutcome | None:
    """No blocking rule (tenant rules, then global rules) matches the destination."""
    number, rate = ctx.number, ctx.rate
    if number is None or rate is None:
        return None
    for rule in _rules(ctx):
        if rule.max_rate is None and _rule_matches(rule, number.e164, rate):
            return _failed(
                "destination",
                Reason.DESTINATION_BLOCKED,
                f"{number.e164} ({rate.dest_class}) is blocked by {_describe_rule(rule)}",
            )
    return _DESTINATION_OK


def check_class(ctx: CheckContext) -> CheckOutcome | None:
    """The destination's class is one the extension's profile allows."""
    ext, rate = ctx.extension, ctx.rate
    if ext is None or rate is None:
        return None
    if rate.dest_class not in ext.allowed_classes:
        return _failed(
            "class",
            Reason.CLASS_NOT_ALLOWED,
            f"class {rate.dest_class} is not allowed by profile {ext.profile}",
        )
    return _CLASS_OK


def check_rate_cap(ctx: CheckContext) -> CheckOutcome | None:
    """No capping rule that matches the destination has a cap below its rate per minute."""
    number, rate = ctx.number, ctx.rate
    if number is None or rate is None:
        return None
    for rule in _rules(ctx):
        if (
            rule.max_rate is not None
            and rate.rate_per_minute > rule.max_rate
            and _rule_matches(rule, number.e164, rate)
        ):
            return _failed(
                "rate_cap",
                Reason.RATE_ABOVE_CAP,
                f"rate {format_money(rate.rate_per_minute)}/min is above the cap "
                f"{format_money(rule.max_rate)}/min of {_describe_rule(rule)}",
            )
    return _RATE_CAP_OK


#: Checks run after the tenant and number checks, in order. ``extra_checks`` go after source IP.
_CHECKS_BEFORE_EXTRA: tuple[Check, ...] = (
    check_extension,
    check_scanner,
    check_user_agent,
    check_source_ip,
)
_CHECKS_AFTER_EXTRA: tuple[Check, ...] = (
    check_time_window,
    check_rate,
    check_destination,
    check_class,
    check_rate_cap,
)
_CHECKS = _CHECKS_BEFORE_EXTRA + _CHECKS_AFTER_EXTRA


def _emergency(
    tenant: TenantConfig | None, extension: ExtensionConfig | None, number: NormalizedNumber
) -> PolicyResult:
    detail = f"emergency number {number.dialed}: every check is bypassed"
    return PolicyResult(
        reason=None,
        outcomes=(CheckOutcome("emergency", True, None, detail),),
        tenant=tenant,
        extension=extension,
        number=number,
        rate=emergency_rate(number),
        is_emergency=True,
    )


def _first_reason(outcomes: Sequence[CheckOutcome]) -> Reason | None:
    for outcome in outcomes:
        if not outcome.passed:
            if outcome.reason is None:
                raise ValueError(f"check {outcome.name!r} failed without a reason")
            return outcome.reason
    return None


def evaluate(
    snapshot: Snapshot,
    attempt: CallAttempt,
    now: datetime,
    extra_checks: Sequence[Check] = (),
) -> PolicyResult:
    """Run every check on ``attempt`` at ``now`` (timezone-aware); the first failure wins.

    Order: tenant (unknown or disabled), number, then emergency numbers pass everything; then
    extension, scanner, User-Agent lock, source IP, ``extra_checks``, time window, rate,
    destination rules, class, rate cap.
    """
    tenant = snapshot.tenant(attempt.tenant)
    if tenant is None:
        if is_emergency_number(None, attempt.number):
            number = NormalizedNumber(attempt.number, attempt.number, is_emergency=True)
            return _emergency(None, None, number)
        outcome = _failed("tenant", Reason.UNKNOWN_TENANT, f"no tenant {_show(attempt.tenant)}")
        return PolicyResult(reason=Reason.UNKNOWN_TENANT, outcomes=(outcome,))

    if tenant.enabled:
        outcomes = [_TENANT_OK]
    else:
        outcomes = [_failed("tenant", Reason.UNKNOWN_TENANT, f"tenant {tenant.name} is disabled")]

    extension = snapshot.extension(tenant.name, attempt.extension)
    normalized: NormalizedNumber | None
    rate: Rate | None = None
    try:
        normalized = normalize_number(tenant, attempt.number)
    except ValidationError as exc:
        normalized = None
        outcomes.append(_failed("number", Reason.INVALID_NUMBER, exc.message))
    else:
        if normalized.is_emergency:
            return _emergency(tenant, extension, normalized)
        outcomes.append(_NUMBER_OK)
        rate = rate_number(snapshot, tenant.name, normalized)

    ctx = CheckContext(
        snapshot,
        attempt,
        now,
        tenant,
        extension,
        normalized,
        rate,
        parse_source_ip(attempt.source_ip),
    )
    checks = (
        (*_CHECKS_BEFORE_EXTRA, *extra_checks, *_CHECKS_AFTER_EXTRA) if extra_checks else _CHECKS
    )
    for check in checks:
        checked = check(ctx)
        if checked is not None:
            outcomes.append(checked)

    return PolicyResult(
        reason=_first_reason(outcomes),
        outcomes=tuple(outcomes),
        tenant=tenant,
        extension=extension,
        number=normalized,
        rate=rate,
        source_ip=ctx.source_ip,
    )
