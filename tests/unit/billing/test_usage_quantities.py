"""An invoice's quantities in one GROUP BY (and one window query for `latest`) are those each
metric's own query gives one stretch at a time, for any meters, groups and stretches; on
SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, delete, event, func

from billing import BillingService
from billing.meters import AGGREGATIONS, MeterSpec, declare_meter, grouped_quantities
from billing.models import Meter, UsageEvent
from billing.usage_quantities import meters_in_use, period_quantities

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
HOURS = 31 * 24
METRICS = ["tokens", "seats", "calls"]

properties = st.sampled_from(["region", "model"])
meters = st.fixed_dictionaries(
    {
        metric: st.tuples(
            st.sampled_from(AGGREGATIONS),
            st.lists(st.sampled_from(["region", "model"]), unique=True),
        )
        for metric in METRICS[:2]  # "calls" keeps the default: sum, no groups
    }
)
usage = st.lists(
    st.tuples(
        st.sampled_from(METRICS),
        st.integers(0, 1000),
        st.integers(-24, HOURS + 24),  # some outside the period
        st.sampled_from([None, "eu", "us"]),
        st.sampled_from([None, "a", "b"]),
    ),
    max_size=14,
)
cuts = st.lists(st.integers(1, HOURS - 1), unique=True, max_size=3).map(sorted)


def stretches_of(hours: list[int]) -> list[tuple[datetime, datetime]]:
    bounds = [JAN, *(JAN + timedelta(hours=hour) for hour in hours), FEB]
    return list(zip(bounds, bounds[1:], strict=False))


def one_at_a_time(session, spec: MeterSpec, stretch: tuple[datetime, datetime]) -> dict:
    start, end = stretch
    query = grouped_quantities(
        spec,
        UsageEvent.tenant_id == "t",
        UsageEvent.metric == spec.key,
        and_(UsageEvent.at_ts >= start, UsageEvent.at_ts < end),
    )
    if spec.aggregation != "latest":  # an aggregate without GROUP BY has a row of no events
        query = query.add_columns(func.count())
    rows = session.execute(query).all()
    width = len(spec.group_by)
    return {
        tuple(row[:width]): int(row[width] or 0)
        for row in rows
        if spec.aggregation == "latest" or row[width + 1]
    }


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(declared=meters, events=usage, hours=cuts)
def test_one_group_by_gives_each_metric_s_quantities_per_stretch_and_group(
    session, declared, events, hours
) -> None:
    session.execute(delete(UsageEvent))
    session.execute(delete(Meter))
    for metric, (aggregation, group_by) in declared.items():
        prop = "model" if aggregation == "unique_count" else None
        declare_meter(
            session, key=metric, aggregation=aggregation, property=prop, group_by=group_by
        )
    service = BillingService(session=session, tenant_id="t")
    for index, (metric, amount, hour, region, model) in enumerate(events):
        metadata = {k: v for k, v in (("region", region), ("model", model)) if v is not None}
        service.record_usage(
            metric=metric,
            amount=amount,
            at=JAN + timedelta(hours=hour, minutes=index),
            idempotency_key=str(uuid.uuid4()),  # PostgreSQL keeps a deleted event's key
            metadata=metadata,
        )
    specs = meters_in_use(session, "t", JAN, FEB, priced=["seats"])
    used = {metric for metric, _, hour, _, _ in events if 0 <= hour < HOURS}
    assert set(specs) == used | {"seats"}
    stretches = stretches_of(hours)
    found = period_quantities(session, "t", stretches, list(specs.values()))
    expected = {
        (index, spec.key): quantities
        for spec in specs.values()
        for index, stretch in enumerate(stretches)
        if (quantities := one_at_a_time(session, spec, stretch))
    }
    assert found == expected


def test_an_invoice_reads_its_usage_in_two_statements_whatever_its_metrics(session, engine) -> None:
    declare_meter(session, key="seats", aggregation="max", group_by=["region"])
    declare_meter(session, key="users", aggregation="unique_count", property="model")
    service = BillingService(session=session, tenant_id="t")
    for index, metric in enumerate(["tokens", "seats", "users", "calls", "gb"]):
        service.record_usage(
            metric=metric,
            amount=index + 1,
            at=JAN + timedelta(days=2 * index),
            idempotency_key=metric,
            metadata={"region": "eu", "model": "m"},
        )
    stretches = stretches_of([100, 150])
    seen: list[str] = []
    record = lambda *args: seen.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", record)
    try:
        specs = meters_in_use(session, "t", JAN, FEB, priced=["tokens"])
        found = period_quantities(session, "t", stretches, list(specs.values()))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(seen) == 2
    assert found == {
        (0, "tokens"): {(): 1},
        (0, "seats"): {("eu",): 2},
        (0, "users"): {(): 1},
        (1, "calls"): {(): 4},
        (2, "gb"): {(): 5},
    }
