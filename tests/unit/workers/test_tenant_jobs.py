"""Jobs of a tenant with a zone: `billing.aggregate_daily` keeps its payload and names the
tenant's local day; the zone cannot change under an invoice run (PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from billing import BillingService, TimezoneLockedError
from billing.models import UsageAggregate
from billing.tenants import get_tenant, set_tenant
from workers import actors
from workers.jobs import USAGE_AGGREGATED, aggregate_daily_job

NY_MIDNIGHT = "2025-03-09T00:00:00-05:00"


def test_the_job_aggregates_the_local_day_and_announces_its_local_midnight(
    session_factory, seeded, outbox
) -> None:
    with session_factory.begin() as session:
        set_tenant(session, "ny", timezone="America/New_York")
    seeded(
        [
            ("ny", 5, datetime(2025, 3, 9, 5, tzinfo=UTC)),
            ("ny", 7, datetime(2025, 3, 10, 3, tzinfo=UTC)),
        ]
    )
    payload = {"tenant_id": "ny", "metric": "tokens", "day_start": NY_MIDNIGHT}
    assert aggregate_daily_job(session_factory, payload) == 12
    # The same day named by a UTC instant inside it: same row, same event.
    inside = {**payload, "day_start": "2025-03-09T20:00:00+00:00"}
    assert aggregate_daily_job(session_factory, inside) == 12
    [event] = outbox(USAGE_AGGREGATED)
    assert {k: v for k, v in event.items() if k != "id"} == {
        "tenant_id": "ny",
        "metric": "tokens",
        "day_start": NY_MIDNIGHT,
        "total": 12,
    }
    with session_factory() as session:
        [row] = session.scalars(select(UsageAggregate))
        assert row.period_start == datetime(2025, 3, 9, 5, tzinfo=UTC)


def test_kathmandu_days_are_announced_at_plus_05_45(session_factory, seeded, outbox) -> None:
    with session_factory.begin() as session:
        set_tenant(session, "ktm", timezone="Asia/Kathmandu")
    seeded([("ktm", 4, datetime(2025, 3, 8, 18, 15, tzinfo=UTC))])
    payload = {"tenant_id": "ktm", "metric": "tokens", "day_start": "2025-03-09T00:00:00+05:45"}
    assert aggregate_daily_job(session_factory, payload) == 4
    assert outbox(USAGE_AGGREGATED)[0]["day_start"] == "2025-03-09T00:00:00+05:45"


def test_enqueue_sends_a_local_midnight_as_it_is_and_a_utc_instant_as_its_day(
    stub_broker,
) -> None:
    local = actors.enqueue_aggregate_daily(
        tenant_id="ny", metric="tokens", day_start=datetime.fromisoformat(NY_MIDNIGHT)
    )
    utc = actors.enqueue_aggregate_daily(
        tenant_id="t", metric="tokens", day_start=datetime(2025, 3, 9, 15, tzinfo=UTC)
    )
    assert local.args[0]["day_start"] == NY_MIDNIGHT
    assert utc.args[0]["day_start"] == "2025-03-09T00:00:00+00:00"


def kathmandu_set(factory) -> str:
    """t1's zone as stored by `set_tenant(..., timezone="Asia/Kathmandu")`, committed."""
    with factory.begin() as session:
        return set_tenant(session, "t1", timezone="Asia/Kathmandu").timezone


@pytest.mark.postgres
def test_a_zone_change_waits_for_a_running_invoice_and_is_then_refused(
    pg_engine, while_held
) -> None:
    from billing.db import make_session_factory

    factory = make_session_factory(pg_engine)
    invoicing = factory()
    invoicing.begin()
    BillingService(session=invoicing, tenant_id="t1").generate_monthly_invoice(
        period_start=datetime(2025, 1, 1, tzinfo=UTC),
        period_end=datetime(2025, 2, 1, tzinfo=UTC),
        currency="usd",
    )  # holds the tenant's zone lock (shared) until it commits

    outcome = while_held(pg_engine, invoicing, lambda: kathmandu_set(factory))
    assert len(outcome) == 1
    assert isinstance(outcome[0], TimezoneLockedError)
    with factory() as session:
        assert get_tenant(session, "t1").timezone == "UTC"


@pytest.mark.postgres
def test_a_zone_change_waits_for_a_running_aggregation_then_drops_its_row(
    pg_engine, while_held
) -> None:
    from billing.db import make_session_factory

    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="tokens", amount=5, at=datetime(2025, 3, 9, 12, tzinfo=UTC), idempotency_key="k"
        )
    aggregating = factory()
    aggregating.begin()
    BillingService(session=aggregating, tenant_id="t1").aggregate_daily(
        metric="tokens", day_start=datetime(2025, 3, 9, tzinfo=UTC)
    )  # a UTC day's row, not committed yet; the zone is share-locked

    assert while_held(pg_engine, aggregating, lambda: kathmandu_set(factory)) == ["Asia/Kathmandu"]
    with factory() as session:
        assert session.scalars(select(UsageAggregate)).all() == []  # the UTC-cut row is gone
