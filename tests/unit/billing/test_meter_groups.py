"""Meters with group_by: one daily aggregate per group of values, beside the whole metric's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from billing import BillingService
from billing.meters import declare_meter
from billing.models import UsageAggregate

from .test_meters import ARRIVALS, PROPERTY_SETTINGS, in_two_waves

DAY = datetime(2025, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def record(bs: BillingService, key: str, amount: int, at: datetime, **metadata: object) -> None:
    bs.record_usage(
        metric="tokens", amount=amount, at=at, idempotency_key=key, metadata=metadata or None
    )


def groups(session) -> dict[str, int]:
    rows = session.execute(select(UsageAggregate.group_key, UsageAggregate.total)).all()
    return {key: total for key, total in rows}


def worked_day(bs: BillingService) -> None:
    record(bs, "a", 10, DAY + 1 * HOUR, model="gpt-4", user="u1")
    record(bs, "b", 3, DAY + 5 * HOUR, model="gpt-4", user="u2")
    record(bs, "c", 50, DAY + 2 * HOUR, model="claude", user="u1")
    record(bs, "d", 1, DAY + 9 * HOUR, user="u3")  # no model: the group of null
    record(bs, "next-day", 99, DAY + 24 * HOUR, model="gpt-4", user="u1")


@pytest.mark.parametrize(
    ("aggregation", "prop", "whole", "gpt4", "claude", "none"),
    [
        ("sum", None, 64, 13, 50, 1),
        ("count", None, 4, 2, 1, 1),
        ("max", None, 50, 10, 50, 1),
        ("unique_count", "user", 3, 2, 1, 1),
        ("latest", None, 1, 3, 50, 1),
    ],
)
def test_each_aggregation_per_group(session, aggregation, prop, whole, gpt4, claude, none) -> None:
    declare_meter(session, key="tokens", aggregation=aggregation, property=prop, group_by=["model"])
    bs = BillingService(session=session, tenant_id="t")
    worked_day(bs)
    assert bs.aggregate_daily(metric="tokens", day_start=DAY) == whole
    assert groups(session) == {
        "": whole,
        '{"model":"gpt-4"}': gpt4,
        '{"model":"claude"}': claude,
        '{"model":null}': none,
    }


def test_two_properties_group_together_and_a_rerun_keeps_the_rows(session) -> None:
    declare_meter(session, key="tokens", group_by=["user", "model"])
    bs = BillingService(session=session, tenant_id="t")
    worked_day(bs)
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    ids = dict(session.execute(select(UsageAggregate.group_key, UsageAggregate.id)).all())
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    session.expire_all()
    assert dict(session.execute(select(UsageAggregate.group_key, UsageAggregate.id)).all()) == ids
    assert groups(session) == {
        "": 64,
        '{"model":"gpt-4","user":"u1"}': 10,
        '{"model":"gpt-4","user":"u2"}': 3,
        '{"model":"claude","user":"u1"}': 50,
        '{"model":null,"user":"u3"}': 1,
    }


def test_a_value_of_any_json_type_groups_as_postgresql_s_text_of_it(session) -> None:
    """Booleans as 'true'/'false', numbers as written, objects as compact JSON, null as absent:
    the same groups on SQLite as on PostgreSQL (json `->>`)."""
    declare_meter(session, key="tokens", group_by=["tier"])
    bs = BillingService(session=session, tenant_id="t")
    values = [True, "true", False, 1, "1", 1.0, 0.1, 1e16, -0.0, 10**20, "x", {"a": [1, "é"]}]
    for index, value in enumerate(values):
        record(bs, str(index), 2**index, DAY, tier=value)
    record(bs, "null", 2**12, DAY, tier=None)
    record(bs, "absent", 2**13, DAY)
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    assert groups(session) == {
        "": 2**14 - 1,
        '{"tier":"true"}': 1 + 2,
        '{"tier":"false"}': 4,
        '{"tier":"1"}': 8 + 16,
        '{"tier":"1.0"}': 32,
        '{"tier":"0.1"}': 64,
        '{"tier":"1e+16"}': 128,
        '{"tier":"-0.0"}': 256,
        '{"tier":"100000000000000000000"}': 512,
        '{"tier":"x"}': 1024,
        '{"tier":"{\\"a\\":[1,\\"\\\\u00e9\\"]}"}': 2048,
        '{"tier":null}': 2**12 + 2**13,
    }


def test_changing_group_by_replaces_the_day_s_groups(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    bs = BillingService(session=session, tenant_id="t")
    worked_day(bs)
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    declare_meter(session, key="tokens", group_by=["user"])
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    assert groups(session) == {"": 64, '{"user":"u1"}': 60, '{"user":"u2"}': 3, '{"user":"u3"}': 1}
    declare_meter(session, key="tokens")
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    assert groups(session) == {"": 64}


def test_a_latest_meter_that_lost_its_groups_drops_them(session) -> None:
    """On PostgreSQL the day is one statement (`billing_aggregate_day`): it drops them too."""
    declare_meter(session, key="tokens", aggregation="latest", group_by=["model"])
    bs = BillingService(session=session, tenant_id="t")
    worked_day(bs)
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    assert len(groups(session)) == 4
    declare_meter(session, key="tokens", aggregation="latest")
    assert bs.aggregate_daily(metric="tokens", day_start=DAY) == 1
    assert groups(session) == {"": 1}


def test_groups_of_other_tenants_and_days_are_left_alone(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    a = BillingService(session=session, tenant_id="a")
    b = BillingService(session=session, tenant_id="b")
    record(a, "a", 1, DAY, model="x")
    record(b, "b", 2, DAY, model="y")
    a.aggregate_daily(metric="tokens", day_start=DAY)
    b.aggregate_daily(metric="tokens", day_start=DAY)
    a.aggregate_daily(metric="tokens", day_start=DAY + 24 * HOUR)
    rows = session.execute(
        select(UsageAggregate.tenant_id, UsageAggregate.period_start, UsageAggregate.group_key)
    ).all()
    assert sorted(rows) == [
        ("a", DAY, ""),
        ("a", DAY, '{"model":"x"}'),
        ("a", DAY + 24 * HOUR, ""),
        ("b", DAY, ""),
        ("b", DAY, '{"model":"y"}'),
    ]


# --- per-group rollups equal a recomputation, for any arrival order --------------------------

raw_events = st.lists(
    st.tuples(
        st.integers(0, 1000),
        st.integers(-3600, 86400 + 3600),
        st.sampled_from(["gpt-4", "claude", None]),
        st.sampled_from(["u1", "u2", None]),
    ),
    max_size=15,
)


def recompute(aggregation: str, events: list) -> dict[str, int]:
    day = [e for e in events if 0 <= e[1] < 86400]
    by_group: dict[str, list] = {}
    for event in day:
        by_group.setdefault(json.dumps({"model": event[2]}, separators=(",", ":")), []).append(
            event
        )
    result = {"": _value(aggregation, day)}
    result.update({key: _value(aggregation, group) for key, group in by_group.items()})
    return result


def _value(aggregation: str, events: list) -> int:
    if not events:
        return 0
    if aggregation == "sum":
        return sum(e[0] for e in events)
    if aggregation == "count":
        return len(events)
    if aggregation == "max":
        return max(e[0] for e in events)
    if aggregation == "unique_count":
        return len({e[3] for e in events if e[3] is not None})
    return max((e[1], e[0]) for e in events)[1]


@PROPERTY_SETTINGS
@given(events=raw_events, **ARRIVALS)
def test_group_rollups_equal_a_recomputation_for_any_arrival_order(
    session_factory, aggregation, events, order, split
) -> None:
    with session_factory() as session:
        prop = "user" if aggregation == "unique_count" else None
        declare_meter(
            session, key="tokens", aggregation=aggregation, property=prop, group_by=["model"]
        )
        bs = BillingService(session=session, tenant_id="t")
        for wave in in_two_waves(events, order, split):
            for index, (amount, offset, model, user) in wave:
                metadata = {k: v for k, v in {"model": model, "user": user}.items() if v}
                record(bs, str(index), amount, DAY + timedelta(seconds=offset), **metadata)
            bs.aggregate_daily(metric="tokens", day_start=DAY)
        assert groups(session) == recompute(aggregation, events)
