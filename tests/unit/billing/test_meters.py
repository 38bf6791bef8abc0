"""Meters: declared aggregations computed in SQL by aggregate_daily, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing import BillingService, MeterDefinitionError
from billing.meters import MeterSpec, declare_meter, get_meter, list_meters
from billing.models import Meter, UsageAggregate

DAY = datetime(2025, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def record(bs: BillingService, key: str, amount: int, at: datetime, **metadata: object) -> None:
    bs.record_usage(
        metric="m", amount=amount, at=at, idempotency_key=key, metadata=metadata or None
    )


def worked_day(bs: BillingService) -> None:
    """Four events of the day (two users, one without a user), one the day before and after."""
    record(bs, "before", 1000, DAY - timedelta(microseconds=1), user="u9")
    record(bs, "a", 5, DAY + 1 * HOUR, user="u1")
    record(bs, "b", 30, DAY + 9 * HOUR, user="u2")
    record(bs, "c", 7, DAY + 20 * HOUR, user="u1")
    record(bs, "d", 2, DAY + 3 * HOUR)
    record(bs, "after", 1000, DAY + 24 * HOUR, user="u8")


@pytest.mark.parametrize(
    ("aggregation", "prop", "expected"),
    [
        ("sum", None, 44),  # 5 + 30 + 7 + 2
        ("count", None, 4),
        ("max", None, 30),
        ("unique_count", "user", 2),  # u1, u2; the event without a user is not counted
        ("latest", None, 7),  # the 20:00 event, though recorded before the 03:00 one
    ],
)
def test_each_aggregation_on_a_worked_day(session, aggregation, prop, expected) -> None:
    declare_meter(session, key="m", aggregation=aggregation, property=prop)
    bs = BillingService(session=session, tenant_id="t1")
    worked_day(bs)
    record(BillingService(session=session, tenant_id="t2"), "other", 99, DAY + HOUR, user="u3")
    assert bs.aggregate_daily(metric="m", day_start=DAY) == expected
    (row,) = session.execute(
        select(UsageAggregate).where(UsageAggregate.tenant_id == "t1")
    ).scalars()
    assert (row.metric, row.period_start, row.total) == ("m", DAY, expected)


@pytest.mark.parametrize("aggregation", ["sum", "count", "max", "unique_count", "latest"])
def test_a_day_without_events_is_zero_for_every_aggregation(session, aggregation) -> None:
    prop = "user" if aggregation == "unique_count" else None
    declare_meter(session, key="m", aggregation=aggregation, property=prop)
    assert (
        BillingService(session=session, tenant_id="t").aggregate_daily(metric="m", day_start=DAY)
        == 0
    )


def test_latest_takes_the_larger_amount_when_two_events_share_the_last_instant(session) -> None:
    declare_meter(session, key="m", aggregation="latest")
    bs = BillingService(session=session, tenant_id="t")
    record(bs, "big", 9, DAY + HOUR)
    record(bs, "small", 4, DAY + HOUR)
    assert bs.aggregate_daily(metric="m", day_start=DAY) == 9


def test_unique_count_compares_values_as_text(session) -> None:
    declare_meter(session, key="m", aggregation="unique_count", property="user")
    bs = BillingService(session=session, tenant_id="t")
    record(bs, "int", 1, DAY, user=7)
    record(bs, "str", 1, DAY, user="7")
    record(bs, "other", 1, DAY, user="8")
    record(bs, "null", 1, DAY, user=None)
    assert bs.aggregate_daily(metric="m", day_start=DAY) == 2


def test_unique_count_reads_booleans_as_true_and_false_as_postgresql_does(session) -> None:
    declare_meter(session, key="m", aggregation="unique_count", property="user")
    bs = BillingService(session=session, tenant_id="t")
    for index, user in enumerate([True, "true", 1, "1", False, "false"]):
        record(bs, str(index), 1, DAY, user=user)
    assert bs.aggregate_daily(metric="m", day_start=DAY) == 3  # "true", "1", "false"


def test_an_undeclared_metric_is_a_sum(session) -> None:
    assert get_meter(session, "m") == MeterSpec("m", "sum")
    bs = BillingService(session=session, tenant_id="t")
    worked_day(bs)
    assert bs.aggregate_daily(metric="m", day_start=DAY) == 44


def test_redeclaring_a_meter_replaces_it_and_the_next_run_uses_it(session) -> None:
    bs = BillingService(session=session, tenant_id="t")
    worked_day(bs)
    declare_meter(session, key="m", aggregation="max", group_by=["model"])
    assert bs.aggregate_daily(metric="m", day_start=DAY) == 30
    declare_meter(session, key="m", aggregation="count")
    assert bs.aggregate_daily(metric="m", day_start=DAY) == 4
    assert list_meters(session) == [MeterSpec("m", "count")]
    assert len(session.execute(select(UsageAggregate)).all()) == 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"key": ""}, "key"),
        ({"key": "x" * 101}, "key"),
        ({"key": "to kens"}, "key"),
        ({"key": "m", "aggregation": "avg"}, "aggregation"),
        ({"key": "m", "aggregation": "unique_count"}, "property"),
        ({"key": "m", "aggregation": "unique_count", "property": 3}, "property"),
        ({"key": "m", "aggregation": "unique_count", "property": 'a"b'}, "property"),
        ({"key": "m", "aggregation": "sum", "property": "user"}, "property"),
        ({"key": "m", "group_by": ["model", ""]}, "group_by[1]"),
        ({"key": "m", "group_by": [1]}, "group_by[0]"),
        ({"key": "m", "group_by": ["$.x"]}, "group_by[0]"),
        ({"key": "m", "group_by": ["model", "model"]}, "group_by"),
        ({"key": "m", "group_by": list("abcdef")}, "group_by"),
    ],
)
def test_a_malformed_declaration_is_refused_and_stores_nothing(session, fields, field) -> None:
    with pytest.raises(MeterDefinitionError) as raised:
        declare_meter(session, **fields)
    assert raised.value.field == field
    assert session.execute(select(Meter)).all() == []


# --- rollups equal a recomputation over the raw events, for any arrival order ---------------

USERS = ["u1", "u2", "u3", None]
raw_events = st.lists(
    st.tuples(
        st.integers(0, 10**6),  # amount
        st.integers(-3600, 86400 + 3600),  # seconds after midnight; some outside the day
        st.sampled_from(USERS),
    ),
    max_size=15,
)


def recompute(aggregation: str, events: list[tuple[int, int, str | None]]) -> int:
    """The day's value computed in Python from the raw events."""
    day = [e for e in events if 0 <= e[1] < 86400]
    if not day:
        return 0
    if aggregation == "sum":
        return sum(amount for amount, _, _ in day)
    if aggregation == "count":
        return len(day)
    if aggregation == "max":
        return max(amount for amount, _, _ in day)
    if aggregation == "unique_count":
        return len({user for _, _, user in day if user is not None})
    return max((offset, amount) for amount, offset, _ in day)[1]


#: Random events with a random arrival order; those after `split` arrive after a first run.
ARRIVALS = {
    "aggregation": st.sampled_from(["sum", "count", "max", "unique_count", "latest"]),
    "order": st.randoms(use_true_random=False),
    "split": st.integers(0, 15),
}
PROPERTY_SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def in_two_waves(events: list, order, split: int) -> list[list[tuple[int, tuple]]]:
    """The indexed events shuffled, then cut at `split`: on time, then late."""
    arrivals = list(enumerate(events))
    order.shuffle(arrivals)
    return [arrivals[:split], arrivals[split:]]


@PROPERTY_SETTINGS
@given(events=raw_events, **ARRIVALS)
def test_rollups_equal_a_recomputation_for_any_arrival_order(
    session_factory, aggregation, events, order, split
) -> None:
    with session_factory() as session:
        prop = "user" if aggregation == "unique_count" else None
        declare_meter(session, key="m", aggregation=aggregation, property=prop)
        bs = BillingService(session=session, tenant_id="t")
        for wave in in_two_waves(events, order, split):
            for index, (amount, offset, user) in wave:
                metadata = {} if user is None else {"user": user}
                record(bs, str(index), amount, DAY + timedelta(seconds=offset), **metadata)
            bs.aggregate_daily(metric="m", day_start=DAY)
        total = session.execute(select(UsageAggregate.total)).scalar_one()
        assert total == recompute(aggregation, events)
