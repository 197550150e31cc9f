"""guard.money: billing edges of call_cost and max_affordable_seconds, decimal parse and format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.domain import DestinationClass, Rate
from guard.errors import ValidationError
from guard.money import (
    MAX_AMOUNT,
    MAX_CALL_SECONDS,
    MAX_RATE,
    billed_seconds,
    call_cost,
    format_money,
    max_affordable_seconds,
    parse_money,
)


def make_rate(per_minute: int, connect_fee: int = 0, initial: int = 1, subsequent: int = 1) -> Rate:
    return Rate(
        "44", "Test", DestinationClass.NATIONAL, per_minute, connect_fee, initial, subsequent
    )


#: 0.60/min billed 60/60 with a 0.10 connect fee: a started minute costs 0.60.
PER_MINUTE = make_rate(6000, connect_fee=1000, initial=60, subsequent=60)
#: 0.60/min billed 30/6 (a common carrier plan), no connect fee.
THIRTY_SIX = make_rate(6000, initial=30, subsequent=6)
#: 0.60/min billed per second.
PER_SECOND = make_rate(6000)


# --- billed_seconds and call_cost ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "billed"), [(-5, 0), (0, 0), (1, 30), (30, 30), (31, 36), (36, 36), (37, 42)]
)
def test_billed_seconds_rounds_up_to_increments(seconds: int, billed: int) -> None:
    assert billed_seconds(THIRTY_SIX, seconds) == billed


def test_unanswered_call_costs_nothing_not_even_the_connect_fee() -> None:
    assert call_cost(PER_MINUTE, 0) == 0


def test_connect_fee_and_first_increment_are_charged_for_the_first_second() -> None:
    assert call_cost(PER_MINUTE, 1) == 1000 + 6000
    assert call_cost(PER_MINUTE, 60) == 1000 + 6000
    assert call_cost(PER_MINUTE, 61) == 1000 + 12000


def test_subsequent_increments() -> None:
    assert call_cost(THIRTY_SIX, 1) == 3000  # 30 s
    assert call_cost(THIRTY_SIX, 31) == 3600  # 36 s
    assert call_cost(THIRTY_SIX, 42) == 4200


def test_per_second_price_is_rounded_up_once_per_call() -> None:
    rate = make_rate(1)  # 0.0001 per minute
    assert call_cost(rate, 1) == 1
    assert call_cost(rate, 60) == 1
    assert call_cost(rate, 61) == 2


def test_zero_rate_costs_only_the_connect_fee() -> None:
    assert call_cost(make_rate(0, connect_fee=500), 3600) == 500
    assert call_cost(make_rate(0), 3600) == 0


# --- max_affordable_seconds ---------------------------------------------------------------------


def test_zero_budget_buys_nothing() -> None:
    assert max_affordable_seconds(PER_SECOND, 0, 3600) == 0
    assert max_affordable_seconds(PER_MINUTE, 0, 3600) == 0


def test_negative_budget_or_cap_buys_nothing() -> None:
    assert max_affordable_seconds(PER_SECOND, -1, 3600) == 0
    assert max_affordable_seconds(PER_SECOND, 10_000, 0) == 0
    assert max_affordable_seconds(PER_SECOND, 10_000, -1) == 0


def test_budget_that_only_covers_the_connect_fee_buys_nothing() -> None:
    assert max_affordable_seconds(PER_MINUTE, 1000, 3600) == 0


def test_budget_exactly_at_the_first_increment() -> None:
    assert max_affordable_seconds(PER_MINUTE, 7000, 3600) == 60
    assert max_affordable_seconds(PER_MINUTE, 6999, 3600) == 0


def test_budget_exactly_at_a_subsequent_increment() -> None:
    assert max_affordable_seconds(PER_MINUTE, 1000 + 3 * 6000, 3600) == 180
    assert max_affordable_seconds(PER_MINUTE, 1000 + 3 * 6000 - 1, 3600) == 120
    assert max_affordable_seconds(THIRTY_SIX, 3600, 3600) == 36
    assert max_affordable_seconds(THIRTY_SIX, 3599, 3600) == 30
    assert max_affordable_seconds(THIRTY_SIX, 2999, 3600) == 0


def test_per_second_budget_boundary() -> None:
    assert max_affordable_seconds(PER_SECOND, 100, 3600) == 1  # 0.01/s
    assert max_affordable_seconds(PER_SECOND, 99, 3600) == 0
    assert max_affordable_seconds(PER_SECOND, 100 * 120, 3600) == 120


def test_zero_rate_is_capped_when_the_connect_fee_is_affordable() -> None:
    assert max_affordable_seconds(make_rate(0), 0, 3600) == 3600
    assert max_affordable_seconds(make_rate(0, connect_fee=500), 500, 3600) == 3600
    assert max_affordable_seconds(make_rate(0, connect_fee=500), 499, 3600) == 0


def test_cap_limits_a_large_budget() -> None:
    assert max_affordable_seconds(PER_SECOND, MAX_AMOUNT, 3600) == 3600
    assert max_affordable_seconds(PER_MINUTE, MAX_AMOUNT, 90) == 90  # capped off a boundary


def test_cap_below_the_first_increment_still_allows_the_call_if_affordable() -> None:
    assert max_affordable_seconds(PER_MINUTE, 7000, 30) == 30
    assert call_cost(PER_MINUTE, 30) <= 7000


rates = st.builds(
    make_rate,
    per_minute=st.integers(0, MAX_RATE),
    connect_fee=st.integers(0, MAX_RATE),
    initial=st.integers(1, 3600),
    subsequent=st.integers(1, 3600),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Rate, int, int]:
    """A rate, a budget (often within a sub-unit or two of a call's exact cost) and a cap."""
    rate = draw(rates)
    if draw(st.booleans()):
        exact = call_cost(rate, draw(st.integers(0, MAX_CALL_SECONDS)))
        budget = max(0, exact + draw(st.integers(-2, 2)))
    else:
        budget = draw(st.integers(0, MAX_AMOUNT))
    return rate, budget, draw(st.integers(0, MAX_CALL_SECONDS))


@given(cases())
def test_affordable_seconds_never_cost_more_than_the_budget(case: tuple[Rate, int, int]) -> None:
    rate, budget, cap = case
    seconds = max_affordable_seconds(rate, budget, cap)
    assert 0 <= seconds <= cap
    assert call_cost(rate, seconds) <= budget


@given(cases())
def test_affordable_seconds_are_the_most_the_budget_buys(case: tuple[Rate, int, int]) -> None:
    rate, budget, cap = case
    seconds = max_affordable_seconds(rate, budget, cap)
    if seconds < cap:
        following = rate.initial_increment if seconds == 0 else seconds + rate.subsequent_increment
        assert call_cost(rate, following) > budget


@given(cases())
def test_uncapped_result_sits_on_an_increment_boundary(case: tuple[Rate, int, int]) -> None:
    rate, budget, cap = case
    seconds = max_affordable_seconds(rate, budget, cap)
    if seconds < cap:
        assert billed_seconds(rate, seconds) == seconds


# --- parse_money and format_money ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("0", 0),
        ("1", 10_000),
        ("1.25", 12_500),
        ("0.0001", 1),
        ("0.10000", 1_000),  # trailing zeros beyond 4 places are exact
        (" 1.5 ", 15_000),
        ("10000000", MAX_AMOUNT),
    ],
)
def test_parse_money(text: str, amount: int) -> None:
    assert parse_money(text) == amount


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a decimal amount"),
        ("abc", "not a decimal amount"),
        ("1,5", "not a decimal amount"),
        ("NaN", "not a decimal amount"),
        ("sNaN", "not a decimal amount"),
        ("Infinity", "not a decimal amount"),
        ("1_000", "not a decimal amount"),
        ("\u0661", "not a decimal amount"),
        ("-1", "must not be negative"),
        ("-0.0001", "must not be negative"),
        ("0.00001", "more than 4 decimal places"),
        ("1E-5", "not a decimal amount"),
        ("1e3", "not a decimal amount"),
        ("-0", "must not be negative"),
        ("10000000.0001", "absurdly large"),
        ("9" * 1000, "absurdly large"),
    ],
)
def test_parse_money_refuses(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        parse_money(text, field="daily_limit")
    assert info.value.field == "daily_limit"


def test_parse_money_refuses_a_huge_exponent_cleanly() -> None:
    with pytest.raises(ValidationError):
        parse_money("1e999999999")


def test_parse_money_refuses_excess_digits_beyond_decimal_precision() -> None:
    with pytest.raises(ValidationError, match="more than 4 decimal places"):
        parse_money("1.00000000000000000000000000001")


def test_parse_money_refuses_a_tiny_exponent() -> None:
    with pytest.raises(ValidationError):
        parse_money("1e-999999999")


@pytest.mark.parametrize(
    ("amount", "text"),
    [(0, "0.0000"), (1, "0.0001"), (12_500, "1.2500"), (-1, "-0.0001"), (-12_500, "-1.2500")],
)
def test_format_money(amount: int, text: str) -> None:
    assert format_money(amount) == text


@given(st.integers(0, MAX_AMOUNT))
def test_format_then_parse_round_trips(amount: int) -> None:
    assert parse_money(format_money(amount)) == amount
