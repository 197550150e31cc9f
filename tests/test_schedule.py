"""guard.schedule: weekly windows across midnight, local time and the tenant's day across DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.errors import ConfigurationError
from guard.schedule import local_hour, local_time, tenant_day, within_windows
from guard.snapshot import WeeklyWindow

MON, TUE, WED, THU, FRI, SAT, SUN = range(7)
OFFICE = WeeklyWindow(MON, 9 * 60, 17 * 60)
#: Friday 22:00 to Saturday 06:00.
FRIDAY_NIGHT = WeeklyWindow(FRI, 22 * 60, 6 * 60)
#: Sunday 22:00 to Monday 06:00: wraps around the end of the week.
SUNDAY_NIGHT = WeeklyWindow(SUN, 22 * 60, 6 * 60)


def at(weekday: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """A naive wall-clock time on the given weekday of the week of Monday 2024-06-03."""
    return datetime(2024, 6, 3 + weekday, hour, minute, second)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_no_windows_means_always() -> None:
    assert within_windows((), at(SUN, 3))


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (at(MON, 8, 59), False),
        (at(MON, 9, 0), True),
        (at(MON, 16, 59, 59), True),
        (at(MON, 17, 0), False),
        (at(TUE, 10, 0), False),
    ],
)
def test_plain_window_includes_start_and_excludes_end(when: datetime, inside: bool) -> None:
    assert within_windows((OFFICE,), when) is inside


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (at(FRI, 21, 59), False),
        (at(FRI, 22, 0), True),
        (at(FRI, 23, 59), True),
        (at(SAT, 0, 0), True),
        (at(SAT, 5, 59), True),
        (at(SAT, 6, 0), False),
        (at(FRI, 3, 0), False),  # Friday's early morning belongs to Thursday night
        (at(THU, 23, 0), False),
    ],
)
def test_window_crossing_midnight_covers_next_morning(when: datetime, inside: bool) -> None:
    assert within_windows((FRIDAY_NIGHT,), when) is inside


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (at(SUN, 23, 0), True),
        (at(MON, 0, 0), True),
        (at(MON, 5, 59), True),
        (at(MON, 6, 0), False),
        (at(SAT, 23, 0), False),
    ],
)
def test_sunday_night_window_wraps_to_monday(when: datetime, inside: bool) -> None:
    assert within_windows((SUNDAY_NIGHT,), when) is inside


def test_whole_day_window() -> None:
    whole = WeeklyWindow(WED, 0, 1440)
    assert within_windows((whole,), at(WED, 0, 0))
    assert within_windows((whole,), at(WED, 23, 59, 59))
    assert not within_windows((whole,), at(THU, 0, 0))
    assert not within_windows((whole,), at(TUE, 23, 59))


def test_equal_start_and_end_is_a_full_day_from_start() -> None:
    window = WeeklyWindow(MON, 8 * 60, 8 * 60)
    assert not within_windows((window,), at(MON, 7, 59))
    assert within_windows((window,), at(MON, 8, 0))
    assert within_windows((window,), at(TUE, 7, 59))
    assert not within_windows((window,), at(TUE, 8, 0))


def test_window_ending_at_midnight() -> None:
    window = WeeklyWindow(FRI, 22 * 60, 0)
    assert within_windows((window,), at(FRI, 23, 59))
    assert not within_windows((window,), at(SAT, 0, 0))


def test_any_window_suffices() -> None:
    windows = (OFFICE, FRIDAY_NIGHT)
    assert within_windows(windows, at(MON, 10))
    assert within_windows(windows, at(SAT, 1))
    assert not within_windows(windows, at(TUE, 10))


@pytest.mark.parametrize(
    ("tz", "now", "wall", "offset_hours"),
    [
        # Europe/Paris springs forward at 01:00 UTC on 2024-03-31 (02:00 CET -> 03:00 CEST).
        ("Europe/Paris", utc(2024, 3, 31, 0, 59), (2024, 3, 31, 1, 59), 1),
        ("Europe/Paris", utc(2024, 3, 31, 1, 0), (2024, 3, 31, 3, 0), 2),
        # and falls back at 01:00 UTC on 2024-10-27: 02:30 happens twice.
        ("Europe/Paris", utc(2024, 10, 27, 0, 30), (2024, 10, 27, 2, 30), 2),
        ("Europe/Paris", utc(2024, 10, 27, 1, 30), (2024, 10, 27, 2, 30), 1),
        # America/New_York springs forward at 07:00 UTC on 2024-03-10 (02:00 EST -> 03:00 EDT).
        ("America/New_York", utc(2024, 3, 10, 6, 59), (2024, 3, 10, 1, 59), -5),
        ("America/New_York", utc(2024, 3, 10, 7, 0), (2024, 3, 10, 3, 0), -4),
        # and falls back at 06:00 UTC on 2024-11-03: 01:30 happens twice.
        ("America/New_York", utc(2024, 11, 3, 5, 30), (2024, 11, 3, 1, 30), -4),
        ("America/New_York", utc(2024, 11, 3, 6, 30), (2024, 11, 3, 1, 30), -5),
    ],
)
def test_local_time_follows_dst(
    tz: str, now: datetime, wall: tuple[int, ...], offset_hours: int
) -> None:
    local = local_time(tz, now)
    assert (local.year, local.month, local.day, local.hour, local.minute) == wall
    assert local.utcoffset() == timedelta(hours=offset_hours)


def test_office_hours_window_follows_paris_summer_time() -> None:
    office = tuple(WeeklyWindow(day, 8 * 60, 18 * 60) for day in (MON, TUE, WED, THU, FRI))
    # 06:30 UTC is 07:30 in winter (CET) and 08:30 in summer (CEST).
    assert not within_windows(office, local_time("Europe/Paris", utc(2024, 3, 25, 6, 30)))
    assert within_windows(office, local_time("Europe/Paris", utc(2024, 4, 1, 6, 30)))


def test_repeated_hour_at_fall_back_is_inside_both_times() -> None:
    window = (WeeklyWindow(SUN, 60, 120),)  # Sunday 01:00-02:00 wall-clock
    assert within_windows(window, local_time("America/New_York", utc(2024, 11, 3, 5, 30)))
    assert within_windows(window, local_time("America/New_York", utc(2024, 11, 3, 6, 30)))


def test_skipped_hour_at_spring_forward_never_happens() -> None:
    window = (WeeklyWindow(SUN, 120, 180),)  # Sunday 02:00-03:00 wall-clock, skipped in Paris
    start = utc(2024, 3, 30, 23, 0)
    minutes = (start + timedelta(minutes=m) for m in range(4 * 60))
    assert not any(within_windows(window, local_time("Europe/Paris", t)) for t in minutes)


def test_local_time_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        local_time("Europe/Paris", datetime(2024, 1, 1, 12, 0))


@pytest.mark.parametrize(
    "name",
    ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "Europe", "zone.tab", "x" * 5000],
)
def test_unknown_time_zone_is_a_configuration_error(name: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown time zone"):
        local_time(name, utc(2024, 1, 1))
    with pytest.raises(ConfigurationError, match="unknown time zone"):
        tenant_day(name, 0)


@pytest.mark.parametrize(
    ("tz", "now", "day"),
    [
        ("UTC", utc(1970, 1, 1).timestamp() + 0.999, "19700101"),
        ("Europe/London", utc(2024, 6, 5, 22, 59, 59).timestamp(), "20240605"),
        ("Europe/London", utc(2024, 6, 5, 23, 0).timestamp(), "20240606"),  # BST midnight
        ("Europe/London", utc(2024, 12, 5, 23, 59, 59).timestamp(), "20241205"),
        # New York: midnight is 05:00 UTC in winter, 04:00 UTC in summer.
        ("America/New_York", utc(2024, 3, 10, 4, 59, 59).timestamp(), "20240309"),
        ("America/New_York", utc(2024, 3, 10, 5, 0).timestamp(), "20240310"),
        ("America/New_York", utc(2024, 3, 11, 3, 59, 59).timestamp(), "20240310"),
        ("America/New_York", utc(2024, 3, 11, 4, 0).timestamp(), "20240311"),
        # Samoa skipped 2011-12-30 when it crossed the date line.
        ("Pacific/Apia", utc(2011, 12, 30, 9, 59, 59).timestamp(), "20111229"),
        ("Pacific/Apia", utc(2011, 12, 30, 10, 0).timestamp(), "20111231"),
    ],
)
def test_tenant_day_is_the_calendar_day_in_the_tenant_zone(tz: str, now: float, day: str) -> None:
    assert tenant_day(tz, now) == day


@given(
    st.integers(min_value=0, max_value=4_102_444_800),
    st.sampled_from(["UTC", "Europe/London", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
)
def test_tenant_day_agrees_with_local_time(epoch: int, tz: str) -> None:
    now = datetime.fromtimestamp(epoch, UTC)
    assert tenant_day(tz, epoch) == local_time(tz, now).strftime("%Y%m%d")


@pytest.mark.parametrize(
    "tz", ["UTC", "Europe/London", "Asia/Kathmandu", "Australia/Lord_Howe", "America/St_Johns"]
)
def test_the_cached_day_and_hour_match_the_time_zone_conversion(tz: str) -> None:
    """They are cached per quarter hour: odd offsets (+05:45, -03:30) and half-hour DST shifts,
    every 37 minutes over a year, and the instant just before each quarter-hour boundary."""
    start = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    for step in range(0, 366 * 86_400, 37 * 60):
        for now in (start + step, start + step - step % 900 - 0.001):
            expected = datetime.fromtimestamp(now, ZoneInfo(tz)).strftime("%Y%m%d%H")
            assert (tenant_day(tz, now), local_hour(tz, now)) == (expected[:8], expected), now
