"""Money: integers of a fixed sub-unit, and the two billing functions every layer shares.

All amounts are ``int`` in 1/10,000 of the currency unit (``SUBUNITS``), never floats. The CLI
reads and prints decimals through ``parse_money``/``format_money``. ``call_cost`` and
``max_affordable_seconds`` define billing; the ledger's Lua script implements the same
arithmetic (tests compare them), so a rule changed here must be changed there too.
"""

from __future__ import annotations

import re

from guard.domain import Rate
from guard.errors import ValidationError

SUBUNITS = 10_000
#: A plain ASCII decimal: no exponent, NaN, underscores or non-ASCII digits.
_DECIMAL = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
#: Upper bound for any single amount (a limit, a rate): keeps every product below 2**53, which is
#: where the Lua (double) arithmetic of the ledger stops being exact.
MAX_AMOUNT = 10_000_000 * SUBUNITS
#: Upper bound for rates per minute and connect fees.
MAX_RATE = 100_000 * SUBUNITS
#: Longest call any rule will ever allow (seconds); also bounds increments.
MAX_CALL_SECONDS = 86_400


def parse_money(text: str, field: str = "amount") -> int:
    """Parse a decimal string (``"1.25"``) into sub-units.

    Only plain ASCII decimals with at most 4 places are accepted: no sign, exponent, NaN,
    underscores or non-ASCII digits, so nothing is rounded silently.
    """
    shown = text[:40] + ("…" if len(text) > 40 else "")
    match = _DECIMAL.fullmatch(text.strip())
    if match is None:
        raise ValidationError(field, f"not a decimal amount: {shown!r}")
    sign, whole = match.group(1), match.group(2)
    fraction = (match.group(3) or "").rstrip("0")
    if sign:
        raise ValidationError(field, f"must not be negative: {shown!r}")
    if len(fraction) > 4:
        raise ValidationError(field, f"more than 4 decimal places: {shown!r}")
    if len(whole.lstrip("0")) > 12:
        raise ValidationError(field, f"absurdly large: {shown!r} (max {format_money(MAX_AMOUNT)})")
    amount = int(whole) * SUBUNITS + int(fraction.ljust(4, "0"))
    if amount > MAX_AMOUNT:
        raise ValidationError(field, f"absurdly large: {shown!r} (max {format_money(MAX_AMOUNT)})")
    return amount


def format_money(amount: int) -> str:
    """Sub-units to a decimal string with 4 places, e.g. ``12500 -> "1.2500"``."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), SUBUNITS)
    return f"{sign}{whole}.{frac:04d}"


def billed_seconds(rate: Rate, seconds: int) -> int:
    """Seconds charged for ``seconds`` of talk time, rounded up to the rate's increments."""
    if seconds <= 0:
        return 0
    if seconds <= rate.initial_increment:
        return rate.initial_increment
    extra = seconds - rate.initial_increment
    steps = -(-extra // rate.subsequent_increment)
    return rate.initial_increment + steps * rate.subsequent_increment


def call_cost(rate: Rate, seconds: int) -> int:
    """Cost in sub-units of an answered call of ``seconds`` (0 if never answered).

    The per-second price is rounded up once per call, in the operator's favour.
    """
    billed = billed_seconds(rate, seconds)
    if billed == 0:
        return 0
    return rate.connect_fee + -(-billed * rate.rate_per_minute // 60)


def max_affordable_seconds(rate: Rate, budget: int, cap: int) -> int:
    """Longest call (seconds, at most ``cap``) whose ``call_cost`` fits in ``budget``.

    Returns 0 when not even the first increment is affordable. The result always sits on an
    increment boundary, so ``call_cost(rate, result) <= budget``.
    """
    if cap <= 0 or budget < 0:
        return 0
    if rate.rate_per_minute == 0:
        return cap if budget >= rate.connect_fee else 0
    available = budget - rate.connect_fee
    if available <= 0:
        return 0
    longest_billed = available * 60 // rate.rate_per_minute
    if longest_billed < rate.initial_increment:
        return 0
    steps = (longest_billed - rate.initial_increment) // rate.subsequent_increment
    seconds = rate.initial_increment + steps * rate.subsequent_increment
    if seconds > cap:
        return cap
    return seconds
