"""Ready-made configuration for tests: the demo tenant ``acme`` and snapshots built around it.

Snapshots are built straight from the dataclasses of ``guard.snapshot`` (no SQL), so every test of
pure logic (rating, policy, engine, ledger) can share one well-known configuration:

- tenant ``acme``: Europe/London, international prefix ``00``, national prefix ``0``, country
  code ``44``, GBP, daily limit 50.00, 10 concurrent calls, calls of at most one hour;
- extensions ``1001`` (profile ``domestic``: local, national, mobile, toll-free; 5.00 a day,
  2 calls) and ``1002`` (profile ``international``: domestic plus international; 20.00 a day,
  4 calls);
- a global rate deck: 44 national 0.02/min, 447 mobile 0.10, 4420 local 0.01, 4490 premium 1.50,
  882 satellite 5.00 (all billed 60/60), 1 and 33 international 0.05 and 0.08 (billed 1/1).

Every builder takes keyword overrides for any field of the dataclass it builds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from guard.domain import CallAttempt, DestinationClass, Rate
from guard.money import parse_money
from guard.snapshot import (
    DEFAULT_SCANNER_PATTERNS,
    DestinationRule,
    ExtensionConfig,
    PrefixTable,
    Snapshot,
    TenantConfig,
)

ACME = "acme"
#: A Wednesday, 13:00 in London (BST): inside any office-hours window.
NOW = datetime(2024, 6, 5, 12, 0, tzinfo=UTC)

DOMESTIC_CLASSES = frozenset(
    {
        DestinationClass.LOCAL,
        DestinationClass.NATIONAL,
        DestinationClass.MOBILE,
        DestinationClass.TOLLFREE,
    }
)
INTERNATIONAL_CLASSES = DOMESTIC_CLASSES | {DestinationClass.INTERNATIONAL}
PROFILES: Mapping[str, frozenset[DestinationClass]] = {
    "domestic": DOMESTIC_CLASSES,
    "international": INTERNATIONAL_CLASSES,
}

#: A London landline, dialed nationally: rated as 4420 local.
LONDON = "02079460000"
#: A UK mobile, dialed nationally: rated as 447 mobile.
UK_MOBILE = "07700900123"
#: A Paris landline, dialed internationally: rated as 33 international.
PARIS = "0033140000000"
#: An Inmarsat-style satellite number: rated as 882 satellite.
SATELLITE = "008821234567"
#: A UK premium-rate number: rated as 4490 premium.
UK_PREMIUM = "09001234567"
USER_AGENT = "Yealink SIP-T46S 66.86.0.15"
SOURCE_IP = "192.0.2.10"


def money(text: str) -> int:
    """Sub-units of a decimal amount, e.g. ``money("0.02") == 200``."""
    return parse_money(text)


def rate(
    prefix: str,
    name: str,
    dest_class: DestinationClass,
    per_minute: str,
    *,
    connect_fee: str = "0",
    increments: tuple[int, int] = (60, 60),
) -> Rate:
    """A rate row with decimal amounts, e.g. ``rate("44", "UK", NATIONAL, "0.02")``."""
    return Rate(
        prefix=prefix,
        name=name,
        dest_class=dest_class,
        rate_per_minute=money(per_minute),
        connect_fee=money(connect_fee),
        initial_increment=increments[0],
        subsequent_increment=increments[1],
    )


def demo_rates() -> dict[str, Rate]:
    """The demo global rate deck, keyed by prefix."""
    rows = (
        rate("44", "United Kingdom", DestinationClass.NATIONAL, "0.02"),
        rate("447", "United Kingdom mobile", DestinationClass.MOBILE, "0.10"),
        rate("4420", "London", DestinationClass.LOCAL, "0.01"),
        rate("4490", "United Kingdom premium", DestinationClass.PREMIUM, "1.50"),
        rate("882", "International networks", DestinationClass.SATELLITE, "5.00"),
        rate("1", "USA and Canada", DestinationClass.INTERNATIONAL, "0.05", increments=(1, 1)),
        rate("33", "France", DestinationClass.INTERNATIONAL, "0.08", increments=(1, 1)),
    )
    return {row.prefix: row for row in rows}


def make_tenant(**overrides: Any) -> TenantConfig:
    """The demo tenant ``acme``, with any field overridden."""
    fields: dict[str, Any] = {
        "name": ACME,
        "timezone": "Europe/London",
        "currency": "GBP",
        "daily_limit": money("50"),
        "concurrent_limit": 10,
        "international_prefix": "00",
        "national_prefix": "0",
        "country_code": "44",
        "max_call_seconds": 3600,
    }
    fields.update(overrides)
    return TenantConfig(**fields)


def make_extension(name: str = "1001", **overrides: Any) -> ExtensionConfig:
    """A demo extension: ``1002`` is international, any other name domestic (unless overridden).

    ``profile`` picks ``allowed_classes`` from ``PROFILES`` unless those are given too.
    """
    international = name == "1002"
    fields: dict[str, Any] = {
        "tenant": ACME,
        "name": name,
        "profile": "international" if international else "domestic",
        "daily_limit": money("20") if international else money("5"),
        "concurrent_limit": 4 if international else 2,
    }
    fields.update(overrides)
    fields.setdefault("allowed_classes", PROFILES[fields["profile"]])
    return ExtensionConfig(**fields)


def make_snapshot(
    *,
    tenants: Iterable[TenantConfig] | None = None,
    extensions: Iterable[ExtensionConfig] | None = None,
    rates: Mapping[str, Rate] | None = None,
    tenant_rates: Mapping[str, Mapping[str, Rate]] | None = None,
    global_rules: tuple[DestinationRule, ...] = (),
    scanner_patterns: tuple[str, ...] = DEFAULT_SCANNER_PATTERNS,
    version: int = 1,
    **tenant_overrides: Any,
) -> Snapshot:
    """A snapshot of the demo configuration.

    ``tenant_overrides`` change the default ``acme`` tenant (ignored when ``tenants`` is given);
    ``rates`` replaces the global deck; ``tenant_rates`` adds per-tenant decks.
    """
    tenant_list = list(tenants) if tenants is not None else [make_tenant(**tenant_overrides)]
    ext_list = (
        list(extensions)
        if extensions is not None
        else [make_extension("1001"), make_extension("1002")]
    )
    return Snapshot(
        version=version,
        tenants={t.name: t for t in tenant_list},
        extensions={(e.tenant, e.name): e for e in ext_list},
        global_rates=PrefixTable(demo_rates() if rates is None else rates),
        tenant_rates={name: PrefixTable(deck) for name, deck in (tenant_rates or {}).items()},
        global_rules=global_rules,
        scanner_patterns=scanner_patterns,
    )


def make_attempt(**overrides: Any) -> CallAttempt:
    """A call from ``acme``/``1001`` to a London number, from a Yealink phone, with overrides."""
    fields: dict[str, Any] = {
        "tenant": ACME,
        "extension": "1001",
        "number": LONDON,
        "source_ip": SOURCE_IP,
        "user_agent": USER_AGENT,
        "call_id": "1717588800.1",
        "linked_id": "1717588800.1",
        "caller_id": "1001",
        "channel": "PJSIP/1001-00000001",
    }
    fields.update(overrides)
    return CallAttempt(**fields)
