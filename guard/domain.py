"""Domain values shared by every layer: reason codes, classes, the call attempt and the decision.

Pure data, no I/O. Reason codes are stable snake_case strings that operators grep and dialplans
branch on: add new ones, never reuse one for another meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Result(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class Reason(StrEnum):
    ALLOWED = "allowed"
    EMERGENCY = "emergency"
    UNKNOWN_TENANT = "unknown_tenant"
    UNKNOWN_EXTENSION = "unknown_extension"
    EXTENSION_LOCKED = "extension_locked"
    SCANNER_USER_AGENT = "scanner_user_agent"
    USER_AGENT_MISMATCH = "user_agent_mismatch"
    IP_BLOCKED = "ip_blocked"
    SOURCE_IP_NOT_ALLOWED = "source_ip_not_allowed"
    COUNTRY_NOT_ALLOWED = "country_not_allowed"
    THREAT_LIST = "threat_list"
    OUTSIDE_TIME_WINDOW = "outside_time_window"
    INVALID_NUMBER = "invalid_number"
    NO_RATE = "no_rate"
    DESTINATION_BLOCKED = "destination_blocked"
    CLASS_NOT_ALLOWED = "class_not_allowed"
    RATE_ABOVE_CAP = "rate_above_cap"
    DAILY_LIMIT_EXTENSION = "daily_limit_extension"
    DAILY_LIMIT_TENANT = "daily_limit_tenant"
    CONCURRENT_LIMIT_EXTENSION = "concurrent_limit_extension"
    CONCURRENT_LIMIT_TENANT = "concurrent_limit_tenant"
    STORE_UNAVAILABLE = "store_unavailable"
    OVERLOADED = "overloaded"
    BAD_REQUEST = "bad_request"
    #: The dialed number starts with a prefix of an imported fraud-number threat list.
    THREAT_NUMBER = "threat_number"
    #: Allowed only because the tenant or extension is in shadow mode (``guard.shadow``): Guard
    #: would have refused it; the would-be reason is in ``Decision.detail`` and the
    #: ``shadow_refused`` event. Nothing is reserved for it: there is nothing to settle.
    SHADOW = "shadow"


class DestinationClass(StrEnum):
    EMERGENCY = "emergency"
    LOCAL = "local"
    NATIONAL = "national"
    MOBILE = "mobile"
    TOLLFREE = "tollfree"
    INTERNATIONAL = "international"
    PREMIUM = "premium"
    SATELLITE = "satellite"
    SPECIAL = "special"


#: Classes that the ``allow_local`` fail mode lets through while the counter store is down.
FAIL_OPEN_CLASSES = frozenset(
    {DestinationClass.EMERGENCY, DestinationClass.LOCAL, DestinationClass.NATIONAL}
)


class FailMode(StrEnum):
    DENY = "deny"
    ALLOW_LOCAL = "allow_local"


class ReservationMode(StrEnum):
    """How a tenant's calls hold budget: the longest affordable call at once (``call``), or one
    slice at a time, extended while the call lasts and the budget allows (``interval``)."""

    CALL = "call"
    INTERVAL = "interval"


class UaLockMode(StrEnum):
    OFF = "off"
    PIN = "pin"
    LEARN = "learn"


class CountryMode(StrEnum):
    """How a tenant's or an extension's country list reads: no list, only these, or not these."""

    OFF = "off"
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Rate:
    """One rate-deck row. Money in sub-units (see ``guard.money``); increments in seconds."""

    prefix: str
    name: str
    dest_class: DestinationClass
    rate_per_minute: int
    connect_fee: int = 0
    initial_increment: int = 1
    subsequent_increment: int = 1


@dataclass(frozen=True, slots=True)
class CallAttempt:
    """Everything an adapter knows about one outbound call, as untrusted strings.

    ``tenant`` and ``extension`` come from the authenticated endpoint, never from the caller ID.
    ``call_id`` is Asterisk's channel ``uniqueid`` (= ARI channel id).
    """

    tenant: str
    extension: str
    number: str
    source_ip: str
    user_agent: str
    call_id: str
    linked_id: str = ""
    caller_id: str = ""
    channel: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """What Guard decided for one call; adapters render it for their protocol."""

    result: Result
    reason: Reason
    max_seconds: int
    call_id: str
    number: str = ""
    destination: Rate | None = None
    reserved: int = 0
    detail: str = ""
    #: Interval reservation: ``max_seconds`` is only the first slice, which Guard extends while
    #: the call lasts and the budget allows, up to ``cap_seconds`` (what the dialplan dials
    #: with). 0 when the whole call is reserved at once.
    cap_seconds: int = 0

    @property
    def allowed(self) -> bool:
        return self.result is Result.ALLOW


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """One policy check's verdict, for ``guard check`` and the audit trail."""

    name: str
    passed: bool
    reason: Reason | None = None
    detail: str = ""
