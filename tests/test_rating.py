"""guard.rating: dialed-number validation, normalization per dialing plan, longest-prefix rating."""

from __future__ import annotations

import pytest
from factories import demo_rates, make_snapshot, make_tenant, rate

from guard.domain import DestinationClass, Rate
from guard.errors import ValidationError
from guard.money import call_cost
from guard.rating import (
    MAX_DIALED_DIGITS,
    NormalizedNumber,
    clean_dialed,
    normalize_number,
    rate_number,
)
from guard.snapshot import PrefixTable, StoredRate, TenantConfig

UK = make_tenant()
FR = make_tenant(name="fr", timezone="Europe/Paris", country_code="33")
US = make_tenant(
    name="us",
    timezone="America/New_York",
    international_prefix="011",
    national_prefix="1",
    country_code="1",
)
#: Italy-style plan: no trunk prefix, national numbers keep their leading 0.
IT = make_tenant(name="it", timezone="Europe/Rome", national_prefix="", country_code="39")
NO_CC = make_tenant(name="nocc", country_code="")


@pytest.mark.parametrize(
    "text", ["1", "0", "+1", "02079460000", "+442079460000", "9" * MAX_DIALED_DIGITS]
)
def test_clean_dialed_accepts_plus_and_digits(text: str) -> None:
    assert clean_dialed(text) == text


def test_clean_dialed_accepts_32_digits_after_a_plus() -> None:
    text = "+" + "4" * MAX_DIALED_DIGITS
    assert clean_dialed(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "+",
        "++44",
        "4+4",
        " 123",
        "123 ",
        "12 34",
        "020-7946",
        "(020)79460000",
        "*21#",
        "123#",
        "*",
        "123\n",
        "\x00",
        "12\x0034",
        "١٢٣",  # Arabic-Indic digits: str.isdigit() is true, a phone cannot dial them
        "１２３",  # fullwidth digits
        "12²",
        "\ud800",  # a lone surrogate
        "9" * (MAX_DIALED_DIGITS + 1),
        "x" * 10_000,
        "1" * 10_000,
    ],
)
def test_clean_dialed_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        clean_dialed(text)
    assert info.value.field == "number"
    assert len(info.value.message) < 120
    info.value.message.encode("ascii")  # safe for any log line


def test_clean_dialed_names_the_offending_character_and_position() -> None:
    with pytest.raises(ValidationError, match=r"'\\x00' at 3"):
        clean_dialed("+44\x00")
    with pytest.raises(ValidationError, match="' ' at 3"):
        clean_dialed("020 7946")


def test_clean_dialed_reports_length_not_content_of_long_input() -> None:
    with pytest.raises(ValidationError, match="too long: 10000 characters"):
        clean_dialed("x" * 10_000)


@pytest.mark.parametrize(
    ("dialed", "e164"),
    [
        ("+442079460000", "442079460000"),
        ("00442079460000", "442079460000"),
        ("02079460000", "442079460000"),
        ("79460000", "4479460000"),  # local subscriber number: country code prepended
        ("0033140000000", "33140000000"),
        ("+0044", "0044"),  # after '+' nothing is rewritten (and nothing will rate it)
    ],
)
def test_normalize_uk_plan(dialed: str, e164: str) -> None:
    assert normalize_number(UK, dialed) == NormalizedNumber(dialed, e164, is_emergency=False)


@pytest.mark.parametrize(
    ("dialed", "e164"),
    [
        ("0140000000", "33140000000"),
        ("0033140000000", "33140000000"),
        ("+33140000000", "33140000000"),
        ("00442079460000", "442079460000"),
    ],
)
def test_normalize_french_plan(dialed: str, e164: str) -> None:
    assert normalize_number(FR, dialed).e164 == e164


@pytest.mark.parametrize(
    ("dialed", "e164"),
    [
        ("011442079460000", "442079460000"),  # international prefix 011
        ("12125551234", "12125551234"),  # national prefix 1 replaced by country code 1
        ("2125551234", "12125551234"),  # ten-digit local number
        ("+12125551234", "12125551234"),
        ("18005551234", "18005551234"),
    ],
)
def test_normalize_nanp_plan(dialed: str, e164: str) -> None:
    assert normalize_number(US, dialed).e164 == e164


@pytest.mark.parametrize(
    ("dialed", "e164"),
    [
        ("0612345678", "390612345678"),
        ("0039061234567", "39061234567"),
        ("3471234567", "393471234567"),
    ],
)
def test_normalize_plan_without_national_prefix_keeps_the_leading_zero(
    dialed: str, e164: str
) -> None:
    assert normalize_number(IT, dialed).e164 == e164


def test_normalize_without_country_code_keeps_national_and_local_numbers_as_dialed() -> None:
    assert normalize_number(NO_CC, "02079460000").e164 == "02079460000"
    assert normalize_number(NO_CC, "79460000").e164 == "79460000"
    assert normalize_number(NO_CC, "00442079460000").e164 == "442079460000"


@pytest.mark.parametrize(
    ("tenant", "dialed"), [(UK, "00"), (UK, "0"), (US, "011"), (US, "1"), (FR, "0")]
)
def test_a_prefix_alone_is_not_a_number(tenant: TenantConfig, dialed: str) -> None:
    with pytest.raises(ValidationError, match="prefix alone"):
        normalize_number(tenant, dialed)


@pytest.mark.parametrize(
    ("tenant", "dialed"),
    [(UK, "999"), (UK, "112"), (US, "911"), (US, "112"), (FR, "15"), (FR, "17"), (FR, "18")],
)
def test_emergency_numbers_are_kept_as_dialed_and_flagged(
    tenant: TenantConfig, dialed: str
) -> None:
    assert normalize_number(tenant, dialed) == NormalizedNumber(dialed, dialed, is_emergency=True)


def test_tenant_emergency_numbers_add_to_the_defaults() -> None:
    tenant = make_tenant(emergency_numbers=frozenset({"101"}))
    assert normalize_number(tenant, "101").is_emergency
    assert normalize_number(tenant, "112").is_emergency


def test_emergency_numbers_match_only_exactly() -> None:
    assert not normalize_number(UK, "+112").is_emergency
    assert not normalize_number(UK, "1120").is_emergency
    assert not normalize_number(UK, "0112").is_emergency


def test_normalize_refuses_invalid_input_with_validation_error() -> None:
    with pytest.raises(ValidationError):
        normalize_number(UK, "020 7946 0000")


@pytest.mark.parametrize(
    ("dialed", "prefix", "dest_class"),
    [
        ("02079460000", "4420", DestinationClass.LOCAL),
        ("01234567890", "44", DestinationClass.NATIONAL),
        ("07700900123", "447", DestinationClass.MOBILE),
        ("09001234567", "4490", DestinationClass.PREMIUM),
        ("0033140000000", "33", DestinationClass.INTERNATIONAL),
        ("+12125551234", "1", DestinationClass.INTERNATIONAL),
        ("008821234567", "882", DestinationClass.SATELLITE),
    ],
)
def test_rate_number_finds_the_longest_prefix(
    dialed: str, prefix: str, dest_class: DestinationClass
) -> None:
    snapshot = make_snapshot()
    found = rate_number(snapshot, "acme", normalize_number(UK, dialed))
    assert found is not None
    assert (found.prefix, found.dest_class) == (prefix, dest_class)


def test_rate_number_without_a_matching_prefix_is_none() -> None:
    assert rate_number(make_snapshot(), "acme", normalize_number(UK, "+8613800000000")) is None


def test_tenant_deck_comes_before_the_global_deck() -> None:
    cheap = rate("44", "Acme UK", DestinationClass.NATIONAL, "0.001")
    snapshot = make_snapshot(tenant_rates={"acme": {"44": cheap}})
    number = normalize_number(UK, "02079460000")
    assert rate_number(snapshot, "acme", number) == cheap
    assert rate_number(snapshot, "other", number) == demo_rates()["4420"]


def test_global_deck_prices_what_the_tenant_deck_does_not() -> None:
    snapshot = make_snapshot(
        tenant_rates={"acme": {"33": rate("33", "FR", DestinationClass.INTERNATIONAL, "0.01")}}
    )
    assert rate_number(snapshot, "acme", normalize_number(UK, "07700900123")) == demo_rates()["447"]


def test_emergency_numbers_get_a_free_synthetic_rate() -> None:
    snapshot = make_snapshot(rates={})
    found = rate_number(snapshot, "acme", normalize_number(UK, "999"))
    assert found is not None
    assert found.dest_class is DestinationClass.EMERGENCY
    assert (found.prefix, found.rate_per_minute, found.connect_fee) == ("999", 0, 0)
    assert call_cost(found, 3600) == 0


def test_a_deck_of_rows_gives_the_same_rates_as_a_deck_of_rates() -> None:
    """``PrefixTable.from_rows`` (what the loader builds) prices exactly like a table of
    ``Rate`` objects; a row becomes its ``Rate`` on the first lookup, later ones reuse it."""
    rates = demo_rates()
    rows: dict[str, StoredRate] = {
        prefix: (
            r.name,
            r.dest_class.value,
            r.rate_per_minute,
            r.connect_fee,
            r.initial_increment,
            r.subsequent_increment,
        )
        for prefix, r in rates.items()
    }
    table, reference = PrefixTable.from_rows(rows), PrefixTable(rates)
    assert len(table) == len(reference)
    for number in ("447700900123", "4420794600", "449001234567", "8613800000000", "4", ""):
        assert table.lookup(number) == reference.lookup(number)
    first = table.lookup("447700900123")
    assert first is not None and first.dest_class is DestinationClass.MOBILE
    assert table.lookup("4477") is first
    assert table.items() == reference.items()
    assert all(isinstance(found, Rate) for _, found in table.items())
