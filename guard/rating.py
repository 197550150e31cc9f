"""Rating: from what a phone dialed to the rate-deck row that prices it.

``clean_dialed`` validates the untrusted dialed string, ``normalize_number`` turns it into the
international form the rate decks are keyed by (digits without ``+``), and ``rate_number`` finds
its longest-prefix rate. Pure functions of the tenant's dialing rules and the snapshot: no I/O.

Normalization rule, in this order:

1. an emergency number (the tenant's list or ``DEFAULT_EMERGENCY_NUMBERS``) is kept exactly as
   dialed and flagged; it is never rewritten, so ``112`` is not mistaken for a ``+1`` number;
2. ``+CC…`` is international: the ``+`` is dropped;
3. a number that starts with the tenant's international prefix (``00``, ``011``) is
   international: the prefix is dropped. It is tried before the national prefix because it is the
   longer one wherever one starts with the other (``00``/``0``, ``011``/``1``);
4. a number that starts with the tenant's national (trunk) prefix (``0``, or ``1`` in NANP) is
   national: the prefix is replaced by the tenant's country code;
5. anything else is a local (subscriber) number: the country code is prepended, so local numbers
   are rated under the country code. A tenant with an empty national prefix (Italy-style, where
   national numbers keep their leading ``0``) lands here for every national number, which is
   right for such plans.

A tenant without a country code cannot make national or local numbers international: they are
kept as dialed (with a national prefix), so only a tenant deck keyed that way can price them and
anything else is refused as ``no_rate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from guard.domain import DestinationClass, Rate
from guard.errors import ValidationError
from guard.snapshot import DEFAULT_EMERGENCY_NUMBERS, Snapshot, TenantConfig

#: Most digits a dialed number may have (E.164 allows 15; carrier-code dial strings are longer).
MAX_DIALED_DIGITS = 32


@dataclass(frozen=True, slots=True)
class NormalizedNumber:
    """A validated dialed number and its rating key.

    ``e164`` is the international form in digits without ``+`` (an emergency number: as dialed).
    """

    dialed: str
    e164: str
    is_emergency: bool = False


def _dialed_problem(text: str) -> str | None:
    """Why ``text`` is not a dialable number, or ``None`` when it is one."""
    offset = 1 if text[:1] == "+" else 0
    digits = text[offset:]
    if not digits:
        return "empty" if not text else "a '+' needs digits after it"
    if len(digits) > MAX_DIALED_DIGITS:
        return f"too long: {len(text)} characters (at most {MAX_DIALED_DIGITS} digits)"
    if not (digits.isascii() and digits.isdigit()):
        index, char = next(
            (i, c) for i, c in enumerate(digits, start=offset) if not "0" <= c <= "9"
        )
        return f"only digits after an optional leading '+' are allowed: {char!a} at {index}"
    return None


def clean_dialed(text: str) -> str:
    """``text`` if it is an optional ``+`` then 1..32 ASCII digits; else ``ValidationError``.

    Deliberately strict: no whitespace, separators, ``*`` or ``#`` (those are feature codes, not
    destinations). The message never echoes more than one offending character.
    """
    problem = _dialed_problem(text)
    if problem is not None:
        raise ValidationError("number", problem)
    return text


def is_emergency_number(tenant: TenantConfig | None, dialed: str) -> bool:
    """Whether ``dialed`` (exactly as dialed) is an emergency number.

    The defaults apply to every tenant, and to a call whose tenant is unknown.
    """
    return dialed in DEFAULT_EMERGENCY_NUMBERS or (
        tenant is not None and dialed in tenant.emergency_numbers
    )


def normalize_number(tenant: TenantConfig, dialed: str) -> NormalizedNumber:
    """Validate ``dialed`` and compute its rating key by the rule in the module docstring."""
    cleaned = clean_dialed(dialed)
    if is_emergency_number(tenant, cleaned):
        return NormalizedNumber(cleaned, cleaned, is_emergency=True)
    intl = tenant.international_prefix
    national = tenant.national_prefix
    if cleaned[0] == "+":
        e164 = cleaned[1:]
    elif intl and cleaned.startswith(intl):
        e164 = cleaned[len(intl) :]
        if not e164:
            raise ValidationError("number", "the international prefix alone is not a number")
    elif national and cleaned.startswith(national):
        subscriber = cleaned[len(national) :]
        if not subscriber:
            raise ValidationError("number", "the national prefix alone is not a number")
        e164 = tenant.country_code + subscriber if tenant.country_code else cleaned
    else:
        e164 = tenant.country_code + cleaned
    return NormalizedNumber(cleaned, e164)


def emergency_rate(number: NormalizedNumber) -> Rate:
    """The synthetic free rate of an emergency number (no deck prices emergency calls)."""
    return Rate(
        prefix=number.dialed,
        name="Emergency",
        dest_class=DestinationClass.EMERGENCY,
        rate_per_minute=0,
    )


def rate_number(snapshot: Snapshot, tenant_name: str, normalized: NormalizedNumber) -> Rate | None:
    """Longest-prefix rate of ``normalized`` (tenant deck first, then global); emergency is free."""
    if normalized.is_emergency:
        return emergency_rate(normalized)
    return snapshot.rate_for(tenant_name, normalized.e164)
