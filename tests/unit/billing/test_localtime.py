"""Local days and months: every instant in exactly one, bounded by local midnights."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.errors import InvalidPeriodError
from billing.localtime import (
    is_midnight,
    local_day,
    local_month,
    local_month_starts,
    previous_local_day,
    previous_local_month,
)

NY = ZoneInfo("America/New_York")
KTM = ZoneInfo("Asia/Kathmandu")
HOUR = timedelta(hours=1)
#: Zones with daylight saving at 02:00, at midnight (Santiago, Havana), half or quarter hours.
ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kathmandu",
    "America/Santiago",
    "America/Havana",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Europe/London",
]


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_new_york_days_across_the_2025_changes_last_23_and_25_hours() -> None:
    spring = local_day(NY, at(2025, 3, 9, 12))
    assert spring == (at(2025, 3, 9, 5), at(2025, 3, 10, 4))
    assert spring.end - spring.start == 23 * HOUR
    autumn = local_day(NY, at(2025, 11, 2, 12))
    assert autumn == (at(2025, 11, 2, 4), at(2025, 11, 3, 5))
    assert autumn.end - autumn.start == 25 * HOUR


def test_a_day_holds_its_first_instant_and_not_its_end() -> None:
    start, end = local_day(NY, at(2025, 3, 9, 12))
    assert local_day(NY, start).start == start
    assert local_day(NY, end - timedelta(microseconds=1)).start == start
    assert local_day(NY, end).start == end


def test_kathmandu_days_start_at_18_15_utc_the_day_before() -> None:
    assert local_day(KTM, at(2025, 3, 9, 18, 14)) == (
        at(2025, 3, 8, 18, 15),
        at(2025, 3, 9, 18, 15),
    )
    assert local_day(KTM, at(2025, 3, 9, 18, 15)).start == at(2025, 3, 9, 18, 15)


def test_months_are_local_calendar_months() -> None:
    march = local_month(NY, at(2025, 3, 15))
    assert march == (at(2025, 3, 1, 5), at(2025, 4, 1, 4))
    assert march.end - march.start == timedelta(days=31) - HOUR
    assert local_month(NY, at(2025, 4, 1, 3, 59)) == march  # still March 31 in New York
    assert local_month(KTM, at(2025, 12, 31, 18, 15)) == (
        at(2025, 12, 31, 18, 15),
        at(2026, 1, 31, 18, 15),
    )


@pytest.mark.parametrize(
    ("moment", "period"),
    [
        (at(2025, 12, 31, 23, 59), (at(2025, 12, 1), at(2026, 1, 1))),
        (at(2026, 1, 1), (at(2026, 1, 1), at(2026, 2, 1))),
        # An instant given in another offset is placed by its UTC value.
        (datetime(2025, 3, 1, 0, 30, tzinfo=timezone(HOUR)), (at(2025, 2, 1), at(2025, 3, 1))),
    ],
)
def test_a_utc_month_is_the_calendar_month_across_a_year_end(moment, period) -> None:
    assert local_month(UTC, moment) == period
    assert local_month(UTC, moment).start.tzinfo is UTC


def test_previous_day_and_month_are_the_last_ones_ended() -> None:
    assert previous_local_day(NY, at(2025, 3, 10, 4)) == (at(2025, 3, 9, 5), at(2025, 3, 10, 4))
    assert previous_local_day(NY, at(2025, 3, 10, 3, 59)).start == at(2025, 3, 8, 5)
    assert previous_local_month(NY, at(2025, 4, 1, 4)) == (at(2025, 3, 1, 5), at(2025, 4, 1, 4))
    assert previous_local_month(NY, at(2025, 4, 1, 3)).start == at(2025, 2, 1, 5)


def test_is_midnight() -> None:
    assert is_midnight(NY, at(2025, 3, 1, 5))
    assert not is_midnight(NY, at(2025, 3, 1))
    assert is_midnight(ZoneInfo("UTC"), at(2025, 3, 1))


def test_a_naive_instant_is_refused() -> None:
    with pytest.raises(InvalidPeriodError):
        local_day(NY, datetime(2025, 3, 1))


@given(
    zone=st.sampled_from(ZONES),
    moment=st.datetimes(
        min_value=datetime(1990, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
)
def test_every_instant_is_in_one_day_and_one_month_that_tile_time(zone, moment) -> None:
    tz = ZoneInfo(zone)
    day = local_day(tz, moment)
    assert day.start <= moment < day.end
    assert timedelta(hours=22) <= day.end - day.start <= timedelta(hours=26)
    assert local_day(tz, day.end).start == day.end  # the next day starts where this one ends
    assert local_day(tz, day.start - timedelta(microseconds=1)).end == day.start
    assert day.start.astimezone(tz).date() != day.end.astimezone(tz).date()
    month = local_month(tz, moment)
    assert month.start <= day.start < day.end <= month.end
    assert local_month(tz, month.end).start == month.end
    assert month.start.astimezone(tz).day == 1
    assert is_midnight(tz, month.start)


#: 2010-03-04 15:00 UTC: Antarctica/Casey from 02:00 on the 5th back to 23:00 on the 4th, the
#: one clock set back across midnight since 1970: the hour after it shows the 4th, in the 5th.
CASEY_BACK = at(2010, 3, 4, 15)


@given(
    zone=st.sampled_from([*ZONES, "Antarctica/Casey"]),
    moments=st.lists(
        st.one_of(
            st.datetimes(
                min_value=datetime(1990, 1, 1),
                max_value=datetime(2040, 1, 1),
                timezones=st.just(UTC),
            ),
            st.integers(-120, 180).map(lambda minutes: CASEY_BACK + timedelta(minutes=minutes)),
        ),
        max_size=30,
    ),
)
def test_month_starts_of_many_instants_are_each_ones_local_month(zone, moments) -> None:
    tz = ZoneInfo(zone)
    # twice each: the second finds its date's midnights known
    many = [*moments, *moments]
    assert local_month_starts(tz, many) == [local_month(tz, m).start for m in many]


class BackAcrossMonthEnd(tzinfo):
    """+11 until 2025-03-31 15:00 UTC (April 1st, 02:00), then +08 (March 31st, 23:00): a
    clock set back across the midnight that starts April, which no real zone has done."""

    CHANGE = datetime(2025, 3, 31, 15)  # UTC
    REPEATED = (datetime(2025, 3, 31, 23), datetime(2025, 4, 1, 2))  # wall times shown twice

    def utcoffset(self, dt: datetime | None) -> timedelta:
        assert dt is not None
        wall = dt.replace(tzinfo=None)
        if wall < self.REPEATED[0] or (wall < self.REPEATED[1] and dt.fold == 0):
            return timedelta(hours=11)
        return timedelta(hours=8)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)

    def fromutc(self, dt: datetime) -> datetime:
        utc = dt.replace(tzinfo=None)
        if utc < self.CHANGE:
            return (utc + timedelta(hours=11)).replace(tzinfo=self)
        wall = utc + timedelta(hours=8)
        return wall.replace(tzinfo=self, fold=int(wall < self.REPEATED[1]))


def test_an_instant_whose_date_is_march_but_past_aprils_midnight_starts_april() -> None:
    tz = BackAcrossMonthEnd()
    april = datetime(2025, 3, 31, 13, tzinfo=UTC)  # April 1st, 00:00 at +11
    late = datetime(2025, 3, 31, 15, 30, tzinfo=UTC)  # shows March 31st, 23:30 at +08
    assert (late.astimezone(tz).month, local_month(tz, late).start) == (3, april)
    before = datetime(2025, 3, 31, 12, tzinfo=UTC)
    march = local_month(tz, before).start
    assert local_month_starts(tz, [before, late, before]) == [march, april, march]
