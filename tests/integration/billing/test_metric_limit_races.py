"""MAX_METRICS_PER_TENANT on PostgreSQL: concurrent senders of new metrics can't pass the limit,
and events of metrics the month has take no lock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select, text

from billing import BillingService, TooManyMetricsError
from billing.db import make_engine, make_session_factory
from billing.models import UsageEvent
from tests.unit.billing.test_ingest_postgresql import advisory_locks_held

pytestmark = pytest.mark.postgres

AT = datetime(2025, 1, 15, tzinfo=UTC)
LIMIT = 5


def send_new_metric(factory, index: int) -> str:
    with factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=LIMIT)
        return bs.record_usage(metric=f"m{index}", amount=1, at=AT, idempotency_key=f"k{index}")


def distinct_metrics(engine: Engine) -> int:
    with engine.connect() as conn:
        query = select(func.count(func.distinct(UsageEvent.metric)))
        return conn.execute(query).scalar_one()


def test_twenty_threads_adding_a_new_metric_each_store_exactly_the_limit(pg_engine, race) -> None:
    factory = make_session_factory(pg_engine)
    results = race(20, lambda i: send_new_metric(factory, i))
    refused = [r for r in results if isinstance(r, TooManyMetricsError)]
    assert len(refused) == 20 - LIMIT, results
    assert distinct_metrics(pg_engine) == LIMIT


def test_the_limit_holds_for_autocommit_sessions_too(pg_engine, race) -> None:
    autocommit = make_engine(
        pg_engine.url.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT"
    )
    try:
        factory = make_session_factory(autocommit)

        def send(index: int) -> str:
            with factory() as session:
                bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=LIMIT)
                return bs.record_usage(
                    metric=f"m{index}", amount=1, at=AT, idempotency_key=f"k{index}"
                )

        results = race(20, send)
        assert sum(isinstance(r, TooManyMetricsError) for r in results) == 20 - LIMIT, results
        assert distinct_metrics(pg_engine) == LIMIT
        with autocommit.connect() as conn:  # every session-level lock was given back
            held = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert conn.execute(text(held)).scalar_one() == 0
    finally:
        autocommit.dispose()


def test_only_a_new_metric_takes_the_tenants_lock(pg_engine) -> None:
    factory = make_session_factory(pg_engine)
    send_new_metric(factory, 0)
    with factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=LIMIT)
        bs.record_usage(metric="m0", amount=1, at=AT, idempotency_key="known")
        assert advisory_locks_held(session) == 0
        bs.record_usage(metric="new", amount=1, at=AT, idempotency_key="new")
        assert advisory_locks_held(session) == 1  # held until commit


def test_the_default_limit_at_its_boundary_on_postgresql(pg_engine) -> None:
    factory = make_session_factory(pg_engine)
    batch = [
        {"metric": f"m{i}", "amount": 1, "at": AT, "idempotency_key": "k"} for i in range(1000)
    ]
    with factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage_batch(batch)
    with pytest.raises(TooManyMetricsError), factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="m1000", amount=1, at=AT, idempotency_key="k"
        )
    assert distinct_metrics(pg_engine) == 1000
