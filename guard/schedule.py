"""Tenant time: weekly call windows, local wall-clock time and the tenant's calendar day.

Time zones come from ``zoneinfo`` (the ``tzdata`` package where the OS has none), so daylight
saving transitions follow the tz database. The ledger keys a tenant's day by ``tenant_day``, and
the time-window check reads ``local_time``: both must agree on the zone. Pure: no I/O beyond the
tz database, which ``zoneinfo`` loads once per zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from guard.errors import ConfigurationError
from guard.snapshot import WeeklyWindow


@lru_cache(maxsize=256)
def zone(tz_name: str) -> ZoneInfo:
    """The ``ZoneInfo`` of ``tz_name``; ``ConfigurationError`` if the tz database lacks it."""
    try:
        return ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ConfigurationError(
            f"unknown time zone {tz_name[:64]!r} ({type(exc).__name__})"
        ) from None


def local_time(tz_name: str, now_utc: datetime) -> datetime:
    """``now_utc`` (timezone-aware) as wall-clock time in ``tz_name``."""
    if now_utc.tzinfo is None:
        raise ValueError("now_utc must be timezone-aware")
    return now_utc.astimezone(zone(tz_name))


#: Seconds in a quarter hour: every UTC offset in use is a whole number of them, so the local
#: day and hour never change inside one (checked against zoneinfo in tests/test_schedule.py).
_QUARTER = 900


@lru_cache(maxsize=8192)
def _local_day_hour(tz_name: str, quarter: int) -> str:
    """``YYYYMMDDHH`` in ``tz_name`` during quarter hour ``quarter`` (epoch seconds // 900)."""
    return datetime.fromtimestamp(quarter * _QUARTER, zone(tz_name)).strftime("%Y%m%d%H")


def tenant_day(tz_name: str, now_epoch: float) -> str:
    """The calendar day (``YYYYMMDD``) in ``tz_name`` at epoch second ``now_epoch``.

    Asked on every call: cached per zone and quarter hour, a lookup instead of a conversion."""
    return _local_day_hour(tz_name, int(now_epoch // _QUARTER))[:8]


def local_hour(tz_name: str, now_epoch: float) -> str:
    """The hour (``YYYYMMDDHH``) in ``tz_name`` at epoch second ``now_epoch`` (cached as
    ``tenant_day``): the hourly spend bucket of a settle."""
    return _local_day_hour(tz_name, int(now_epoch // _QUARTER))


def _in_window(window: WeeklyWindow, weekday: int, minute: int) -> bool:
    """Whether minute ``minute`` of ``weekday`` (0 = Monday) falls in ``window``.

    A window with ``end <= start`` crosses midnight: it covers ``start``..24:00 on its weekday
    and 00:00..``end`` on the next day (Sunday wraps to Monday).
    """
    if window.end > window.start:
        return weekday == window.weekday and window.start <= minute < window.end
    if weekday == window.weekday:
        return minute >= window.start
    return weekday == (window.weekday + 1) % 7 and minute < window.end


def within_windows(windows: Sequence[WeeklyWindow], local_dt: datetime) -> bool:
    """Whether wall-clock ``local_dt`` falls in any of ``windows``; no windows means always."""
    if not windows:
        return True
    weekday = local_dt.weekday()
    minute = local_dt.hour * 60 + local_dt.minute
    return any(_in_window(window, weekday, minute) for window in windows)
