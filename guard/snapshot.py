"""The immutable in-memory configuration the hot path reads: tenants, extensions, rates, rules.

Built from SQL by ``guard.config.loader`` and swapped atomically when the configuration version
changes. Nothing here does I/O; every collection is read-only after construction (a rate deck
only swaps a stored row for its equal ``Rate`` the first time a lookup finds it), so the engine
can share one snapshot between all concurrent calls without locks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network
from typing import Final, cast

from guard.domain import CountryMode, DestinationClass, FailMode, Rate, ReservationMode, UaLockMode

IPNetwork = IPv4Network | IPv6Network

#: Numbers that are always emergency numbers, whatever the configuration says.
DEFAULT_EMERGENCY_NUMBERS = frozenset(
    {"112", "911", "999", "000", "110", "118", "119", "15", "17", "18"}
)

#: The profiles every new tenant gets; an extension without a profile gets ``domestic``.
DEFAULT_PROFILES: Final[dict[str, tuple[DestinationClass, ...]]] = {
    "domestic": (
        DestinationClass.EMERGENCY,
        DestinationClass.LOCAL,
        DestinationClass.NATIONAL,
        DestinationClass.MOBILE,
        DestinationClass.TOLLFREE,
    ),
    "international": (
        DestinationClass.EMERGENCY,
        DestinationClass.LOCAL,
        DestinationClass.NATIONAL,
        DestinationClass.MOBILE,
        DestinationClass.TOLLFREE,
        DestinationClass.INTERNATIONAL,
    ),
}
DEFAULT_PROFILE = "domestic"

#: User-Agent fragments of known SIP scanners, matched case-insensitively as substrings.
DEFAULT_SCANNER_PATTERNS: tuple[str, ...] = (
    "friendly-scanner",
    "friendly-request",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sipsak",
    "sundayddr",
    "iwar",
    "sivus",
    "gulp",
    "sipv",
    "smap",
    "vaxipuseragent",
    "vaxsipuseragent",
    "siparmyknife",
    "test agent",
)


@dataclass(frozen=True, slots=True)
class WeeklyWindow:
    """Calls allowed on ``weekday`` (0 = Monday) from ``start`` to ``end`` minutes after midnight.

    ``end <= start`` means the window crosses midnight and ends on the next day at ``end``.
    ``start == 0 and end == 1440`` is the whole day.
    """

    weekday: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class DestinationRule:
    """Refuses destinations by prefix and/or class.

    ``max_rate is None``: matching destinations are blocked outright (``destination_blocked``).
    Otherwise a matching destination whose rate per minute is above ``max_rate`` is refused
    (``rate_above_cap``). A rule with neither prefix nor class matches every destination.
    """

    prefix: str | None = None
    dest_class: DestinationClass | None = None
    max_rate: int | None = None


#: A rate-deck row as the loader stores it: the fields of its ``Rate`` after the prefix, with the
#: destination class as its value (``DestinationClass.value``). A plain tuple of strings and
#: integers: built in C, a million at a time, and no longer tracked by the garbage collector
#: once a collection has seen it.
StoredRate = tuple[str, str, int, int, int, int]
_STORED_RATE_FIELDS = (
    "name",
    "dest_class",
    "rate_per_minute",
    "connect_fee",
    "initial_increment",
    "subsequent_increment",
)
if tuple(f.name for f in fields(Rate)) != ("prefix", *_STORED_RATE_FIELDS):
    raise ImportError("guard.domain.Rate changed: update StoredRate and PrefixTable")
_CLASSES = {member.value: member for member in DestinationClass}


class PrefixTable:
    """Rate deck keyed by prefix; longest-prefix lookup is O(number of digits) dict probes.

    A deck loaded from SQL (``from_rows``) keeps each prefix as a ``StoredRate`` until a lookup
    first finds it: that lookup makes its ``Rate`` and keeps it in the row's place, so every
    later lookup returns that same object. Building a million ``Rate`` objects up front would
    be the largest cost of a snapshot build, for rows most of which no call ever uses. The swap
    is a plain dict store on an existing key: safe for concurrent readers, which see either the
    row or the equal ``Rate``, and for snapshots sharing the table.

    ``source`` names the SQL deck the rows came from, ``(deck id, stamp)``: the loader gives the
    next snapshot this same table while the deck keeps its stamp (``RateDeck.stamp``).
    """

    __slots__ = ("_longest", "_rates", "_source")

    def __init__(self, rates: Mapping[str, Rate] | None = None) -> None:
        self._rates: dict[str, Rate | StoredRate] = dict(rates or {})
        self._longest = max(map(len, self._rates), default=0)
        self._source: tuple[int, str] | None = None

    @classmethod
    def from_rows(
        cls,
        rows: dict[str, StoredRate],
        longest: int | None = None,
        source: tuple[int, str] | None = None,
    ) -> PrefixTable:
        """A table over ``rows`` (prefix → ``StoredRate``) itself, not a copy: the caller hands
        the dict over and must not keep or change it. Class values must be valid. ``longest``,
        the length of the longest prefix, spares a pass over every prefix when the caller
        counted it already."""
        table = cls.__new__(cls)
        table._rates = cast("dict[str, Rate | StoredRate]", rows)
        table._longest = max(map(len, rows), default=0) if longest is None else longest
        table._source = source
        return table

    @property
    def source(self) -> tuple[int, str] | None:
        return self._source

    def __len__(self) -> int:
        return len(self._rates)

    def lookup(self, number: str) -> Rate | None:
        """The rate of the longest prefix of ``number``, or ``None``."""
        rates = self._rates
        for length in range(min(len(number), self._longest), 0, -1):
            prefix = number[:length]
            found = rates.get(prefix)
            if found is not None:
                if isinstance(found, tuple):
                    found = rates[prefix] = _rate(prefix, found)
                return found
        return None

    def items(self) -> list[tuple[str, Rate]]:
        return sorted(
            (prefix, _rate(prefix, found) if isinstance(found, tuple) else found)
            for prefix, found in self._rates.items()
        )


def _rate(prefix: str, row: StoredRate) -> Rate:
    name, dest_class, per_minute, fee, initial, subsequent = row
    return Rate(prefix, name, _CLASSES[dest_class], per_minute, fee, initial, subsequent)


@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    timezone: str = "UTC"
    currency: str = "EUR"
    daily_limit: int | None = None
    concurrent_limit: int | None = None
    fail_mode: FailMode = FailMode.DENY
    international_prefix: str = "00"
    national_prefix: str = "0"
    country_code: str = ""
    #: Longest call any extension of the tenant may make, in seconds.
    max_call_seconds: int = 3600
    networks: tuple[IPNetwork, ...] = ()
    windows: tuple[WeeklyWindow, ...] = ()
    rules: tuple[DestinationRule, ...] = ()
    emergency_numbers: frozenset[str] = DEFAULT_EMERGENCY_NUMBERS
    enabled: bool = True
    #: Refused attempts from one IP in the window that block it, and for how long (seconds);
    #: ``None``: the global settings.
    block_threshold: int | None = None
    block_seconds: int | None = None
    #: Source addresses never blocked nor refused as ``ip_blocked`` for this tenant.
    ip_allow: tuple[IPNetwork, ...] = ()
    #: GeoIP country list (ISO 3166 alpha-2 codes, upper case) of the source address.
    country_mode: CountryMode = CountryMode.OFF
    countries: frozenset[str] = frozenset()
    #: How the tenant's calls hold budget: the longest affordable call at once, or one slice of
    #: ``slice_seconds`` at a time, extended while the call lasts (``guard.interval``).
    reservation_mode: ReservationMode = ReservationMode.CALL
    slice_seconds: int = 300
    #: Shadow mode (``guard.shadow``): every call is judged, none refused (but see
    #: ``shadow_enforce_perimeter`` and ``guard.shadow.ALWAYS_ENFORCED``).
    shadow: bool = False
    #: In shadow mode, still refuse the perimeter's reasons (``guard.shadow.PERIMETER_REASONS``).
    shadow_enforce_perimeter: bool = True


@dataclass(frozen=True, slots=True)
class ExtensionConfig:
    tenant: str
    name: str
    profile: str
    allowed_classes: frozenset[DestinationClass]
    daily_limit: int | None = None
    concurrent_limit: int | None = None
    ua_mode: UaLockMode = UaLockMode.OFF
    #: ``pin``: a glob (``fnmatch``, case-sensitive) the User-Agent must match.
    #: ``learn``: the learned value, or ``None`` while nothing was learned yet.
    ua_value: str | None = None
    locked: bool = False
    lock_reason: str = ""
    networks: tuple[IPNetwork, ...] = ()
    windows: tuple[WeeklyWindow, ...] = ()
    #: GeoIP country list of the source address, checked besides the tenant's.
    country_mode: CountryMode = CountryMode.OFF
    countries: frozenset[str] = frozenset()
    #: Shadow mode for this extension alone (the tenant's ``shadow`` covers every extension).
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view of the whole configuration at ``version``."""

    version: int = 0
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    extensions: Mapping[tuple[str, str], ExtensionConfig] = field(default_factory=dict)
    global_rates: PrefixTable = field(default_factory=PrefixTable)
    tenant_rates: Mapping[str, PrefixTable] = field(default_factory=dict)
    global_rules: tuple[DestinationRule, ...] = ()
    scanner_patterns: tuple[str, ...] = DEFAULT_SCANNER_PATTERNS
    built_at: float = 0.0
    build_seconds: float = 0.0
    #: Source addresses no tenant ever blocks (the global allow-list kept in SQL).
    ip_allow: tuple[IPNetwork, ...] = ()
    #: Epoch seconds when a temporary limit raise applied in this snapshot ends (the earliest):
    #: the snapshot must be rebuilt then. ``None``: no raise applies.
    expires_at: float | None = None

    def tenant(self, name: str) -> TenantConfig | None:
        return self.tenants.get(name)

    def extension(self, tenant: str, name: str) -> ExtensionConfig | None:
        return self.extensions.get((tenant, name))

    def rate_for(self, tenant: str, normalized_number: str) -> Rate | None:
        """Tenant deck first, then the global deck (longest prefix within each)."""
        table = self.tenant_rates.get(tenant)
        if table is not None:
            rate = table.lookup(normalized_number)
            if rate is not None:
                return rate
        return self.global_rates.lookup(normalized_number)
