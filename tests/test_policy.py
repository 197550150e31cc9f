"""guard.policy: every check on its edges, their order, and emergency numbers bypassing them all."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest
from factories import (
    NOW,
    PARIS,
    SATELLITE,
    UK_MOBILE,
    UK_PREMIUM,
    make_attempt,
    make_extension,
    make_snapshot,
    make_tenant,
    money,
)

from guard.domain import CheckOutcome, DestinationClass, Reason, UaLockMode
from guard.policy import CheckContext, PolicyResult, evaluate, parse_source_ip
from guard.snapshot import DestinationRule, Snapshot, WeeklyWindow

ALL_CHECKS = (
    "tenant",
    "number",
    "extension",
    "scanner",
    "user_agent",
    "source_ip",
    "time_window",
    "rate",
    "destination",
    "class",
    "rate_cap",
)


def run(snapshot: Snapshot | None = None, now: datetime = NOW, **attempt: str) -> PolicyResult:
    return evaluate(snapshot or make_snapshot(), make_attempt(**attempt), now)


def outcome(result: PolicyResult, name: str) -> CheckOutcome:
    (found,) = (o for o in result.outcomes if o.name == name)
    return found


def names(result: PolicyResult) -> tuple[str, ...]:
    return tuple(o.name for o in result.outcomes)


def with_extension(**overrides: object) -> Snapshot:
    """The demo snapshot with extension 1001 changed."""
    return make_snapshot(extensions=[make_extension("1001", **overrides), make_extension("1002")])


# --- the allowed path ---------------------------------------------------------------------------


def test_allowed_call_passes_every_check_in_order() -> None:
    result = run()
    assert result.reason is None and result.passed and not result.is_emergency
    assert names(result) == ALL_CHECKS
    assert all(o.passed and o.reason is None for o in result.outcomes)
    assert result.tenant is not None and result.tenant.name == "acme"
    assert result.extension is not None and result.extension.name == "1001"
    assert result.number is not None and result.number.e164 == "442079460000"
    assert result.rate is not None and result.rate.prefix == "4420"


# --- tenant -------------------------------------------------------------------------------------


def test_unknown_tenant_is_refused_and_nothing_else_is_computed() -> None:
    result = run(tenant="nobody")
    assert result.reason is Reason.UNKNOWN_TENANT
    assert names(result) == ("tenant",)
    assert result.tenant is None and result.number is None and result.rate is None


def test_disabled_tenant_is_refused_but_other_checks_are_still_shown() -> None:
    result = run(make_snapshot(enabled=False))
    assert result.reason is Reason.UNKNOWN_TENANT
    assert "disabled" in outcome(result, "tenant").detail
    assert names(result) == ALL_CHECKS
    assert all(o.passed for o in result.outcomes[1:])


def test_extension_of_another_tenant_is_unknown() -> None:
    snapshot = make_snapshot(tenants=[make_tenant(), make_tenant(name="beta")])
    assert run(snapshot, tenant="beta").reason is Reason.UNKNOWN_EXTENSION


# --- number -------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["", "020 7946 0000", "*21#", "1\x002", "9" * 10_000, "00"])
def test_invalid_number_is_refused_and_rating_checks_are_skipped(number: str) -> None:
    result = run(number=number)
    assert result.reason is Reason.INVALID_NUMBER
    assert result.number is None and result.rate is None
    assert names(result) == ALL_CHECKS[:7]
    assert outcome(result, "number").detail


# --- emergency numbers --------------------------------------------------------------------------


def hostile_snapshot() -> Snapshot:
    """A configuration that refuses everything an ordinary call could do."""
    ext = make_extension(
        "1001",
        locked=True,
        lock_reason="fraud suspected",
        ua_mode=UaLockMode.PIN,
        ua_value="Nothing*",
        networks=(ip_network("10.0.0.0/8"),),
        windows=(WeeklyWindow(0, 0, 1),),
        allowed_classes=frozenset(),
    )
    return make_snapshot(
        extensions=[ext],
        rates={},
        networks=(ip_network("10.0.0.0/8"),),
        windows=(WeeklyWindow(0, 0, 1),),
        rules=(DestinationRule(),),
        timezone="No/Such_Zone",
    )


@pytest.mark.parametrize("number", ["112", "999", "911"])
@pytest.mark.parametrize(
    "attempt",
    [
        {},
        {"extension": "no-such-extension"},
        {"user_agent": "friendly-scanner"},
        {"source_ip": "not an address"},
        {"tenant": "unknown-tenant"},
    ],
)
def test_emergency_numbers_bypass_every_check(number: str, attempt: dict[str, str]) -> None:
    result = evaluate(hostile_snapshot(), make_attempt(number=number, **attempt), NOW)
    assert result.reason is None and result.passed and result.is_emergency
    assert names(result) == ("emergency",)
    assert result.number is not None and result.number.e164 == number
    assert result.rate is not None and result.rate.dest_class is DestinationClass.EMERGENCY
    assert result.rate.rate_per_minute == 0


def test_emergency_bypasses_a_disabled_tenant() -> None:
    result = run(make_snapshot(enabled=False), number="999")
    assert result.is_emergency and result.reason is None
    assert result.tenant is not None and result.extension is not None


def test_tenant_specific_emergency_number_bypasses_checks() -> None:
    snapshot = make_snapshot(emergency_numbers=frozenset({"101"}))
    result = run(snapshot, number="101", extension="ghost", user_agent="sipvicious")
    assert result.is_emergency and result.reason is None


def test_unknown_tenant_only_gets_the_default_emergency_numbers() -> None:
    assert run(tenant="ghost", number="101").reason is Reason.UNKNOWN_TENANT
    assert run(tenant="ghost", number=" 112").reason is Reason.UNKNOWN_TENANT


# --- extension ----------------------------------------------------------------------------------


def test_unknown_extension_skips_checks_that_need_it() -> None:
    result = run(extension="9999")
    assert result.reason is Reason.UNKNOWN_EXTENSION
    assert names(result) == (
        "tenant",
        "number",
        "extension",
        "scanner",
        "rate",
        "destination",
        "rate_cap",
    )


def test_locked_extension_is_refused_with_its_lock_reason() -> None:
    result = run(with_extension(locked=True, lock_reason="User-Agent changed"))
    assert result.reason is Reason.EXTENSION_LOCKED
    assert "User-Agent changed" in outcome(result, "extension").detail
    assert names(result) == ALL_CHECKS


# --- scanner User-Agents ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_agent",
    [
        "friendly-scanner",
        "FRIENDLY-SCANNER",
        "Mozilla friendly-Scanner 1.0",
        "sipvicious",
        "SIPVicious 0.3.4",
        "sipcli/v1.8",
        "sip-scan",
        "sipsak 0.9.6",
        "sundayddr",
        "iWar",
        "SIVuS",
        "Gulp",
        "sipv",
        "smap 0.6",
        "friendly-request",
        "VaxIPUserAgent/3.1",
        "VaxSIPUserAgent/3.5",
        "siparmyknife",
        "Test Agent",
    ],
)
def test_scanner_user_agents_are_refused_case_insensitively(user_agent: str) -> None:
    result = run(user_agent=user_agent)
    assert result.reason is Reason.SCANNER_USER_AGENT
    assert not outcome(result, "scanner").passed


@pytest.mark.parametrize(
    "user_agent",
    [
        "Yealink SIP-T46S 66.86.0.15",
        "Grandstream GXP2170 1.0.11.3",
        "Linksys/SPA942",
        "MicroSIP/3.21.3",
        "Zoiper rv2.10.19.4",
        "",
    ],
)
def test_ordinary_user_agents_are_not_scanners(user_agent: str) -> None:
    assert outcome(run(user_agent=user_agent), "scanner").passed


def test_configured_scanner_patterns_match_case_insensitively_and_ignore_empty_ones() -> None:
    snapshot = make_snapshot(scanner_patterns=("EvilBot", ""))
    assert run(snapshot, user_agent="evilbot/1.0").reason is Reason.SCANNER_USER_AGENT
    assert run(snapshot).reason is None


def test_scanner_detail_escapes_and_truncates_the_user_agent() -> None:
    detail = outcome(run(user_agent="sipvicious\n\x00" + "é" * 500), "scanner").detail
    assert detail.isascii() and "\n" not in detail and "\x00" not in detail
    assert len(detail) < 200


# --- User-Agent lock ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "user_agent", "passed"),
    [
        ("Yealink SIP-T46S *", "Yealink SIP-T46S 66.86.0.15", True),
        ("Yealink SIP-T4?S *", "Yealink SIP-T48S 66.86.0.15", True),
        ("Yealink SIP-T46S *", "Yealink SIP-T48S 66.86.0.15", False),
        ("Yealink SIP-T46S *", "yealink sip-t46s 66.86.0.15", False),  # case-sensitive
        ("Yealink*", "", False),
        ("*", "", True),
        ("", "Yealink SIP-T46S 66.86.0.15", False),  # pin mode without a pattern
        (None, "Yealink SIP-T46S 66.86.0.15", False),
    ],
)
def test_pinned_user_agent_is_a_case_sensitive_glob(
    pattern: str | None, user_agent: str, passed: bool
) -> None:
    result = run(with_extension(ua_mode=UaLockMode.PIN, ua_value=pattern), user_agent=user_agent)
    assert outcome(result, "user_agent").passed is passed
    assert result.reason is (None if passed else Reason.USER_AGENT_MISMATCH)


def test_learn_mode_passes_before_anything_is_learned() -> None:
    result = run(with_extension(ua_mode=UaLockMode.LEARN, ua_value=None))
    assert result.reason is None
    assert "will learn" in outcome(result, "user_agent").detail


def test_learn_mode_passes_the_learned_user_agent() -> None:
    snapshot = with_extension(ua_mode=UaLockMode.LEARN, ua_value="Yealink SIP-T46S 66.86.0.15")
    assert run(snapshot).reason is None


def test_learn_mode_refuses_a_different_user_agent_even_by_case() -> None:
    snapshot = with_extension(ua_mode=UaLockMode.LEARN, ua_value="Yealink SIP-T46S 66.86.0.15")
    assert run(snapshot, user_agent="Yealink SIP-T46S 66.86.0.16").reason is (
        Reason.USER_AGENT_MISMATCH
    )
    assert run(snapshot, user_agent="yealink sip-t46s 66.86.0.15").reason is (
        Reason.USER_AGENT_MISMATCH
    )


def test_user_agent_lock_off_ignores_the_user_agent() -> None:
    snapshot = with_extension(ua_mode=UaLockMode.OFF, ua_value="Something else")
    assert run(snapshot, user_agent="Anything").reason is None


# --- source IP ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.10", IPv4Address("192.0.2.10")),
        ("192.0.2.10:5060", IPv4Address("192.0.2.10")),
        ("2001:db8::5", IPv6Address("2001:db8::5")),
        ("[2001:db8::5]", IPv6Address("2001:db8::5")),
        ("[2001:db8::5]:5070", IPv6Address("2001:db8::5")),
        ("::ffff:192.0.2.10", IPv4Address("192.0.2.10")),
        ("[::ffff:192.0.2.10]:5060", IPv4Address("192.0.2.10")),
        ("fe80::1%eth0", IPv6Address("fe80::1%eth0")),
    ],
)
def test_parse_source_ip_accepts_addresses_with_or_without_port(
    text: str, address: IPv4Address | IPv6Address
) -> None:
    assert parse_source_ip(text) == address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-an-ip",
        "999.1.1.1",
        "192.0.2.10:",
        "192.0.2.10:0",
        "192.0.2.10:65536",
        "192.0.2.10:50x",
        "192.0.2.10:٥٠٦٠",
        "[192.0.2.10]:5060",
        "[2001:db8::5",
        "[2001:db8::5]5060",
        "[2001:db8::5]:",
        " 192.0.2.10",
        "192.0.2.10\x00",
        "1" * 10_000,
    ],
)
def test_parse_source_ip_refuses_anything_else(text: str) -> None:
    assert parse_source_ip(text) is None


@pytest.mark.parametrize("source_ip", ["", "bogus", "300.0.0.1", "x" * 10_000])
def test_unparsable_source_ip_is_refused_even_without_networks(source_ip: str) -> None:
    result = run(source_ip=source_ip)
    assert result.reason is Reason.SOURCE_IP_NOT_ALLOWED
    detail = outcome(result, "source_ip").detail
    assert detail.startswith("not an IP address") and len(detail) < 200


def test_source_ip_inside_extension_network_passes_and_outside_fails() -> None:
    snapshot = with_extension(networks=(ip_network("192.0.2.0/24"),))
    assert run(snapshot, source_ip="192.0.2.200").reason is None
    result = run(snapshot, source_ip="198.51.100.1")
    assert result.reason is Reason.SOURCE_IP_NOT_ALLOWED
    assert "extension" in outcome(result, "source_ip").detail


def test_source_ip_must_be_inside_both_extension_and_tenant_networks() -> None:
    snapshot = make_snapshot(
        extensions=[make_extension("1001", networks=(ip_network("192.0.2.0/24"),))],
        networks=(ip_network("192.0.2.0/25"),),
    )
    assert run(snapshot, source_ip="192.0.2.10").reason is None
    result = run(snapshot, source_ip="192.0.2.200")
    assert result.reason is Reason.SOURCE_IP_NOT_ALLOWED
    assert "tenant" in outcome(result, "source_ip").detail


def test_tenant_networks_alone_restrict_every_extension() -> None:
    snapshot = make_snapshot(networks=(ip_network("10.0.0.0/8"),))
    assert run(snapshot, source_ip="10.1.2.3").reason is None
    assert run(snapshot, source_ip="192.0.2.10").reason is Reason.SOURCE_IP_NOT_ALLOWED
    assert run(snapshot, extension="1002", source_ip="192.0.2.10").reason is (
        Reason.SOURCE_IP_NOT_ALLOWED
    )


def test_ipv6_networks() -> None:
    snapshot = with_extension(networks=(ip_network("2001:db8::/32"), ip_network("192.0.2.0/24")))
    assert run(snapshot, source_ip="2001:db8:1::5").reason is None
    assert run(snapshot, source_ip="[2001:db8::5]:5060").reason is None
    assert run(snapshot, source_ip="2001:db9::1").reason is Reason.SOURCE_IP_NOT_ALLOWED
    assert run(snapshot, source_ip="192.0.2.1").reason is None


def test_ipv4_address_is_not_inside_an_ipv6_only_network() -> None:
    snapshot = with_extension(networks=(ip_network("2001:db8::/32"),))
    assert run(snapshot, source_ip="192.0.2.10").reason is Reason.SOURCE_IP_NOT_ALLOWED


def test_ipv4_mapped_ipv6_source_matches_ipv4_networks() -> None:
    snapshot = with_extension(networks=(ip_network("192.0.2.0/24"),))
    assert run(snapshot, source_ip="::ffff:192.0.2.10").reason is None
    assert run(snapshot, source_ip="::ffff:198.51.100.1").reason is Reason.SOURCE_IP_NOT_ALLOWED


# --- time windows -------------------------------------------------------------------------------

WEDNESDAY = 2
#: NOW is Wednesday 12:00 UTC, which is 13:00 in London (BST).
LONDON_13_TO_14 = (WeeklyWindow(WEDNESDAY, 13 * 60, 14 * 60),)
LONDON_12_TO_13 = (WeeklyWindow(WEDNESDAY, 12 * 60, 13 * 60),)


def test_time_windows_are_read_in_the_tenant_time_zone() -> None:
    assert run(with_extension(windows=LONDON_13_TO_14)).reason is None
    result = run(with_extension(windows=LONDON_12_TO_13))
    assert result.reason is Reason.OUTSIDE_TIME_WINDOW
    assert "Wed 13:00 Europe/London" in outcome(result, "time_window").detail


def test_tenant_windows_restrict_every_extension() -> None:
    snapshot = make_snapshot(windows=LONDON_12_TO_13)
    assert run(snapshot).reason is Reason.OUTSIDE_TIME_WINDOW
    assert run(snapshot, extension="1002").reason is Reason.OUTSIDE_TIME_WINDOW


def test_time_must_be_inside_both_extension_and_tenant_windows() -> None:
    snapshot = make_snapshot(
        extensions=[make_extension("1001", windows=LONDON_13_TO_14)], windows=LONDON_12_TO_13
    )
    result = run(snapshot)
    assert result.reason is Reason.OUTSIDE_TIME_WINDOW
    assert "tenant" in outcome(result, "time_window").detail


def test_unknown_tenant_time_zone_fails_closed_only_when_windows_exist() -> None:
    assert run(make_snapshot(timezone="No/Such_Zone")).reason is None
    result = run(make_snapshot(timezone="No/Such_Zone", windows=LONDON_13_TO_14))
    assert result.reason is Reason.OUTSIDE_TIME_WINDOW
    assert "unknown time zone" in outcome(result, "time_window").detail


# --- rating and destination rules ---------------------------------------------------------------


def test_number_without_rate_is_refused() -> None:
    result = run(number="+8613800000000")
    assert result.reason is Reason.NO_RATE
    assert names(result) == ALL_CHECKS[:8]
    assert "8613800000000" in outcome(result, "rate").detail


def test_class_not_in_profile_is_refused() -> None:
    assert run(number=PARIS).reason is Reason.CLASS_NOT_ALLOWED
    assert run(number=PARIS, extension="1002").reason is None
    assert run(number=UK_PREMIUM, extension="1002").reason is Reason.CLASS_NOT_ALLOWED
    assert run(number=UK_MOBILE).reason is None


def test_blocking_rule_by_prefix_matches_the_normalized_number() -> None:
    snapshot = make_snapshot(rules=(DestinationRule(prefix="447"),))
    for dialed in (UK_MOBILE, "00447700900123", "+447700900123"):
        assert run(snapshot, number=dialed).reason is Reason.DESTINATION_BLOCKED
    assert run(snapshot).reason is None


def test_global_blocking_rule_by_class() -> None:
    snapshot = make_snapshot(
        extensions=[make_extension("1002", allowed_classes=frozenset(DestinationClass))],
        global_rules=(DestinationRule(dest_class=DestinationClass.SATELLITE),),
    )
    assert run(snapshot, extension="1002", number=SATELLITE).reason is Reason.DESTINATION_BLOCKED
    assert run(snapshot, extension="1002", number=UK_PREMIUM).reason is None


def test_blocking_rule_with_prefix_and_class_needs_both() -> None:
    rule = DestinationRule(prefix="44", dest_class=DestinationClass.MOBILE)
    snapshot = make_snapshot(rules=(rule,))
    assert run(snapshot, number=UK_MOBILE).reason is Reason.DESTINATION_BLOCKED
    assert run(snapshot).reason is None  # 44 but local, not mobile


def test_rule_without_prefix_or_class_blocks_everything() -> None:
    result = run(make_snapshot(rules=(DestinationRule(),)))
    assert result.reason is Reason.DESTINATION_BLOCKED
    assert "every destination" in outcome(result, "destination").detail


def test_rate_cap_refuses_rates_above_it_and_allows_rates_at_it() -> None:
    cap = DestinationRule(dest_class=DestinationClass.INTERNATIONAL, max_rate=money("0.05"))
    snapshot = make_snapshot(rules=(cap,))
    assert run(snapshot, extension="1002", number=PARIS).reason is Reason.RATE_ABOVE_CAP
    assert run(snapshot, extension="1002", number="+12125551234").reason is None


def test_global_rate_cap_without_prefix_or_class_applies_to_all() -> None:
    snapshot = make_snapshot(global_rules=(DestinationRule(max_rate=money("0.015")),))
    assert run(snapshot).reason is None  # London local: 0.01
    assert run(snapshot, number=UK_MOBILE).reason is Reason.RATE_ABOVE_CAP


def test_cap_rule_does_not_block_outright() -> None:
    snapshot = make_snapshot(rules=(DestinationRule(prefix="44", max_rate=money("1")),))
    assert run(snapshot, number=UK_MOBILE).reason is None


def test_destination_checks_report_in_order_blocked_then_class_then_cap() -> None:
    snapshot = make_snapshot(
        rules=(
            DestinationRule(dest_class=DestinationClass.PREMIUM),
            DestinationRule(prefix="44", max_rate=money("1")),
        )
    )
    result = run(snapshot, number=UK_PREMIUM)
    assert result.reason is Reason.DESTINATION_BLOCKED
    failed = [o.reason for o in result.outcomes if not o.passed]
    assert failed == [Reason.DESTINATION_BLOCKED, Reason.CLASS_NOT_ALLOWED, Reason.RATE_ABOVE_CAP]


# --- order and extension points -----------------------------------------------------------------


def test_first_failure_wins_and_later_failures_are_still_reported() -> None:
    snapshot = with_extension(locked=True, networks=(ip_network("10.0.0.0/8"),))
    result = run(snapshot, user_agent="sipvicious", number=PARIS)
    assert result.reason is Reason.EXTENSION_LOCKED
    failed = [o.reason for o in result.outcomes if not o.passed]
    assert failed == [
        Reason.EXTENSION_LOCKED,
        Reason.SCANNER_USER_AGENT,
        Reason.SOURCE_IP_NOT_ALLOWED,
        Reason.CLASS_NOT_ALLOWED,
    ]


def _country_check(ctx: CheckContext) -> CheckOutcome:
    """A stand-in GeoIP check: only 192.0.2.0/24 is "in the country"."""
    inside = ctx.source_ip is not None and ctx.source_ip in ip_network("192.0.2.0/24")
    if inside:
        return CheckOutcome("country", True)
    return CheckOutcome("country", False, Reason.COUNTRY_NOT_ALLOWED, "elsewhere")


def test_extra_checks_run_after_source_ip_and_before_time_window() -> None:
    result = evaluate(make_snapshot(), make_attempt(), NOW, extra_checks=[_country_check])
    assert names(result) == (*ALL_CHECKS[:6], "country", *ALL_CHECKS[6:])
    assert result.reason is None
    refused = evaluate(
        make_snapshot(), make_attempt(source_ip="198.51.100.1"), NOW, [_country_check]
    )
    assert refused.reason is Reason.COUNTRY_NOT_ALLOWED


def test_extra_check_failure_comes_after_earlier_failures() -> None:
    snapshot = with_extension(networks=(ip_network("10.0.0.0/8"),))
    result = evaluate(snapshot, make_attempt(source_ip="198.51.100.1"), NOW, [_country_check])
    assert result.reason is Reason.SOURCE_IP_NOT_ALLOWED
    assert not outcome(result, "country").passed


def test_extra_check_returning_none_is_left_out() -> None:
    result = evaluate(make_snapshot(), make_attempt(), NOW, [lambda ctx: None])
    assert names(result) == ALL_CHECKS


def test_extra_check_failing_without_a_reason_is_a_programming_error() -> None:
    broken = [lambda ctx: CheckOutcome("broken", False)]
    with pytest.raises(ValueError, match="broken"):
        evaluate(make_snapshot(), make_attempt(), NOW, broken)


def test_checks_do_not_depend_on_snapshot_identity() -> None:
    first = run()
    second = evaluate(replace(make_snapshot(), version=2), make_attempt(), NOW)
    assert first.outcomes == second.outcomes
