"""GET /_billing/usage for a tenant with a zone: its local days and months, `period_start` with
the zone's offset, as the webhook payloads show them (UTC tenants keep `Z`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing import BillingService
from billing.meters import declare_meter
from billing.tenants import set_tenant

TICK = timedelta(microseconds=1)


def seed(session_factory, tenant: str, zone: str | None, april: datetime) -> None:
    """Two events either side of the tenant's local April 1st midnight (`april`, in UTC)."""
    with session_factory.begin() as session:
        if zone is not None:
            set_tenant(session, tenant, timezone=zone)
        bs = BillingService(session=session, tenant_id=tenant)
        bs.record_usage(metric="tokens", amount=1, at=april - TICK, idempotency_key="march")
        bs.record_usage(metric="tokens", amount=10, at=april, idempotency_key="april")


def periods(client, headers, **params) -> list[tuple[str, int]]:
    response = client.get("/_billing/usage", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return [(item["period_start"], item["total"]) for item in response.json()["items"]]


@pytest.mark.parametrize(
    ("zone", "april", "days", "months"),
    [
        (
            "America/New_York",
            datetime(2025, 4, 1, 4, tzinfo=UTC),
            ["2025-03-31T00:00:00-04:00", "2025-04-01T00:00:00-04:00"],
            ["2025-03-01T00:00:00-05:00", "2025-04-01T00:00:00-04:00"],
        ),
        (
            "Asia/Kathmandu",
            datetime(2025, 3, 31, 18, 15, tzinfo=UTC),
            ["2025-03-31T00:00:00+05:45", "2025-04-01T00:00:00+05:45"],
            ["2025-03-01T00:00:00+05:45", "2025-04-01T00:00:00+05:45"],
        ),
        (
            None,
            datetime(2025, 4, 1, tzinfo=UTC),
            ["2025-03-31T00:00:00Z", "2025-04-01T00:00:00Z"],
            ["2025-03-01T00:00:00Z", "2025-04-01T00:00:00Z"],
        ),
    ],
)
def test_usage_periods_are_the_tenants_local_days_and_months_with_its_offset(
    client, a_key, session_factory, zone, april, days, months
) -> None:
    seed(session_factory, "A", zone, april)
    assert periods(client, a_key, metric="tokens") == list(zip(days, [1, 10], strict=True))
    assert periods(client, a_key, metric="tokens", granularity="month") == list(
        zip(months, [1, 10], strict=True)
    )
    # `from` and `to` are instants: the local midnight, in any offset, bounds the periods.
    assert periods(client, a_key, metric="tokens", **{"from": days[1]}) == [(days[1], 10)]
    assert periods(client, a_key, metric="tokens", to=days[1]) == [(days[0], 1)]


def test_grouped_usage_shows_the_local_day_with_its_offset(client, a_key, session_factory) -> None:
    april = datetime(2025, 4, 1, 4, tzinfo=UTC)
    with session_factory.begin() as session:
        set_tenant(session, "A", timezone="America/New_York")
        declare_meter(session, key="tokens", aggregation="sum", group_by=["model"])
        bs = BillingService(session=session, tenant_id="A")
        bs.record_usage(
            metric="tokens", amount=4, at=april, idempotency_key="k", metadata={"model": "m1"}
        )
        bs.aggregate_daily(metric="tokens", day_start=april)
    response = client.get(
        "/_billing/usage", params={"metric": "tokens", "group_by": "model"}, headers=a_key
    )
    assert [(i["period_start"], i["group"], i["total"]) for i in response.json()["items"]] == [
        ("2025-04-01T00:00:00-04:00", {"model": "m1"}, 4)
    ]
