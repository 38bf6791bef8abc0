"""Days and months on a tenant's wall clock, as `[start, end)` instants in UTC.

A local day runs from one local midnight to the next: 24 hours, or 23 and 25 across a daylight
saving change. Where a zone skips midnight itself (clocks jump from 00:00 to 01:00), the day
starts at the first instant that carries its date. Every instant belongs to exactly one local
day and one local month; for `UTC` they are the UTC day and calendar month.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import NamedTuple

from billing.errors import InvalidPeriodError, InvalidTimezoneError
from webhooks.safetext import safe_text

UTC_NAME = "UTC"
_DAY = timedelta(days=1)


class Period(NamedTuple):
    """`[start, end)` in aware UTC datetimes."""

    start: datetime
    end: datetime


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> tzinfo:
    """The `tzinfo` of a validated zone name.

    Raises:
        InvalidTimezoneError: this machine's zone database lacks it (a zone stored by one with
            a newer database): a job reading it fails for good, until `tzdata` is upgraded.
    """
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidTimezoneError(
            f"time zone {safe_text(name[:64])!r} is not in this machine's zone database: "
            "upgrade the tzdata package"
        ) from None


def midnight(zone: tzinfo, day: date) -> datetime:
    """The instant (UTC) at which `day` begins on the wall clock of `zone`."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def local_day(zone: tzinfo, moment: datetime) -> Period:
    """The local day of `zone` that contains the aware instant `moment`.

    Raises:
        InvalidPeriodError: `moment` is naive.
    """
    day = _aware(moment).astimezone(zone).date()
    start, end = midnight(zone, day), midnight(zone, day + _DAY)
    # A clock set back across midnight gives some instants a date whose midnight comes after
    # them: step to the day whose bounds hold the instant (each midnight computed once).
    while start > moment:
        day -= _DAY
        start, end = midnight(zone, day), start
    while end <= moment:
        day += _DAY
        start, end = end, midnight(zone, day + _DAY)
    return Period(start, end)


def local_month(zone: tzinfo, moment: datetime) -> Period:
    """The local calendar month of `zone` that contains the aware instant `moment`."""
    first = local_day(zone, moment).start.astimezone(zone).date().replace(day=1)
    return Period(midnight(zone, first), midnight(zone, _next_month(first)))


def local_month_starts(zone: tzinfo, moments: Iterable[datetime]) -> list[datetime]:
    """`local_month(zone, moment).start` of each of `moments`, in order, for many at once.

    The local midnights are found once per wall-clock date (a batch of events spans a few):
    an instant its date's midnight and the next hold lies in that local day, and so in the
    month `local_month` gives that day; `local_month` itself runs only for the others (an
    instant in the hour after a clock set back across midnight).
    """
    bounds: dict[date, tuple[datetime, datetime, datetime]] = {}
    starts: list[datetime] = []
    for moment in moments:
        day = _aware(moment).astimezone(zone).date()
        known = bounds.get(day)
        if known is None:
            start = midnight(zone, day)
            first = start.astimezone(zone).date().replace(day=1)
            known = bounds[day] = (start, midnight(zone, day + _DAY), midnight(zone, first))
        start, end, month_start = known
        starts.append(month_start if start <= moment < end else local_month(zone, moment).start)
    return starts


def previous_local_day(zone: tzinfo, moment: datetime) -> Period:
    """The last local day of `zone` that ended at or before `moment`."""
    today = local_day(zone, moment)
    return local_day(zone, today.start - timedelta(microseconds=1))


def previous_local_month(zone: tzinfo, moment: datetime) -> Period:
    """The last local month of `zone` that ended at or before `moment`."""
    this_month = local_month(zone, moment)
    return local_month(zone, this_month.start - timedelta(microseconds=1))


def local_date(zone: tzinfo, period: Period) -> date:
    """The wall-clock date on which `period` starts in `zone`."""
    return period.start.astimezone(zone).date()


def is_midnight(zone: tzinfo, moment: datetime) -> bool:
    """True when `moment` is the start of a local day of `zone`."""
    return local_day(zone, moment).start == moment


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def _aware(moment: object) -> datetime:
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise InvalidPeriodError("a timezone-aware datetime is required")
    return moment
