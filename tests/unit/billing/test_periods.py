"""The one subscription-in-period rule, at its boundaries (`effective_at < end`,
`ended_at > start`), as invoicing and the invoice fan-out both apply it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing.invoicing import price_lines
from billing.models import Plan, Price, Subscription
from billing.periods import subscription_active_in, subscription_overlaps
from workers.fanout import invoice_targets_query

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
TICK = timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("effective_at", "ended_at", "active"),
    [
        (FEB, None, False),  # begins exactly when the period ends
        (FEB - TICK, None, True),
        (JAN - timedelta(days=9), JAN, False),  # ends exactly when the period begins
        (JAN - timedelta(days=9), JAN + TICK, True),
        (JAN, FEB, True),
    ],
)
def test_a_subscription_is_active_when_it_overlaps_the_period(
    session, effective_at, ended_at, active
) -> None:
    plan = Plan(key="p", name="P")
    session.add(plan)
    session.flush()
    session.add(
        Price(
            key="fee", plan_id=plan.id, currency="usd", unit_amount=3100, recurring_interval="month"
        )
    )
    session.add(
        Subscription(tenant_id="t1", plan_id=plan.id, effective_at=effective_at, ended_at=ended_at)
    )
    session.flush()
    matched = session.execute(select(Subscription.id).where(subscription_active_in(JAN, FEB))).all()
    targets = session.execute(invoice_targets_query(JAN, FEB)).all()
    lines = price_lines(session, "t1", JAN, FEB, "usd")
    assert (len(matched), len(targets), len(lines)) == ((1, 1, 1) if active else (0, 0, 0))
    assert subscription_overlaps(effective_at, ended_at, JAN, FEB) is active
