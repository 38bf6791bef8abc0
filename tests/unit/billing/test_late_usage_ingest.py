"""LATE_USAGE at ingest: `reject` refuses usage in a period that has a finalized invoice and
stores nothing; `ignore` stores and counts it; `next_invoice` stores it. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from billing import BillingService, InvoicePolicy, PeriodClosedError
from billing.late_usage import ClosedPeriod, closed_periods
from billing.models import Invoice, UsageEvent
from tests.unit.billing.test_lifecycle import FEB, JAN, LATER, MAR, generate
from tests.unit.billing.test_lifecycle import plan as plan

MID_JAN = JAN + timedelta(days=14)


def service(session, late_usage="reject", tenant="t1") -> BillingService:
    return BillingService(
        session=session,
        tenant_id=tenant,
        now=lambda: LATER,
        policy=InvoicePolicy(late_usage=late_usage),
    )


def record(session, at, key="k", late_usage="reject", tenant="t1", amount=5) -> str:
    return service(session, late_usage, tenant).record_usage(
        metric="tokens", amount=amount, at=at, idempotency_key=key
    )


def stored(session) -> int:
    return session.execute(select(func.count()).select_from(UsageEvent)).scalar_one()


def add_open_invoice(session, start, end, currency="usd") -> None:
    """A finalized invoice of t1 for `[start, end)`, added as a row."""
    session.add(
        Invoice(
            tenant_id="t1",
            period_start=start,
            period_end=end,
            status="open",
            total_amount=0,
            currency=currency,
        )
    )
    session.flush()


def ignored_total() -> float:
    return REGISTRY.get_sample_value("billing_late_usage_ignored_total") or 0.0


def test_reject_refuses_usage_in_a_finalized_period_naming_it_and_stores_nothing(
    session, plan
) -> None:
    generate(session)
    with pytest.raises(PeriodClosedError) as caught:
        record(session, MID_JAN)
    assert (caught.value.period_start, caught.value.period_end) == (JAN, FEB)
    assert caught.value.index is None
    assert str(caught.value).startswith(f"the period {JAN.isoformat()} to {FEB.isoformat()} ")
    assert stored(session) == 0


@pytest.mark.parametrize(
    ("at", "refused"),
    [
        (JAN, True),
        (FEB - timedelta(microseconds=1), True),
        (FEB, False),  # the end of a period is the next period's first instant
        (JAN - timedelta(microseconds=1), False),
    ],
)
def test_reject_closes_exactly_the_invoice_s_period(session, plan, at, refused) -> None:
    generate(session)
    if refused:
        with pytest.raises(PeriodClosedError):
            record(session, at)
        assert stored(session) == 0
    else:
        record(session, at)
        assert stored(session) == 1


def test_a_batch_around_a_closed_period_but_outside_it_is_stored(session, plan) -> None:
    generate(session)
    batch = [
        {
            "metric": "tokens",
            "amount": 1,
            "at": JAN - timedelta(microseconds=1),
            "idempotency_key": "a",
        },
        {"metric": "tokens", "amount": 1, "at": FEB, "idempotency_key": "b"},
    ]
    service(session).record_usage_batch(batch)
    assert stored(session) == 2


@pytest.mark.parametrize(
    ("metric", "key"), [("calls", "k"), ("tokens", "other")], ids=["other-metric", "other-key"]
)
def test_a_late_event_is_a_duplicate_only_of_its_own_metric_and_key(
    session, plan, metric, key
) -> None:
    service(session).record_usage(metric=metric, amount=5, at=MID_JAN, idempotency_key=key)
    generate(session)
    with pytest.raises(PeriodClosedError):
        record(session, MID_JAN, key="k")
    assert stored(session) == 1


def test_a_draft_or_a_void_invoice_does_not_close_its_period(session, plan) -> None:
    draft = generate(session, grace_period=timedelta(days=3))
    record(session, MID_JAN, key="during-draft")
    service(session).void_invoice(draft.id)
    record(session, MID_JAN, key="after-void")
    assert stored(session) == 2


@pytest.mark.parametrize("status", ["paid", "uncollectible"])
def test_paid_and_uncollectible_invoices_close_their_period_too(session, plan, status) -> None:
    invoice = generate(session)
    invoice.status = status
    session.flush()
    with pytest.raises(PeriodClosedError):
        record(session, MID_JAN)


def test_an_invoice_in_any_currency_closes_the_period_for_an_event(session, plan) -> None:
    add_open_invoice(session, JAN, FEB, currency="eur")
    with pytest.raises(PeriodClosedError):
        record(session, MID_JAN)


def test_closed_periods_are_the_finalized_ones_overlapping_the_times_oldest_first(
    session,
) -> None:
    """Only the periods `[start, end)` that meet `[min(times), max(times)]` are read."""
    dec = JAN - timedelta(days=31)
    for start, end in ((FEB, MAR), (MAR, MAR + timedelta(days=31)), (dec, JAN), (JAN, FEB)):
        add_open_invoice(session, start, end)
    assert closed_periods(session, "t1", [FEB, MID_JAN]) == [
        ClosedPeriod(JAN, FEB),
        ClosedPeriod(FEB, MAR),
    ]
    # January ends where the times start: it does not meet them.
    assert closed_periods(session, "t1", [FEB + timedelta(days=1), FEB]) == [ClosedPeriod(FEB, MAR)]


def test_another_tenant_s_invoice_closes_nothing_for_this_one(session, plan) -> None:
    generate(session, "t2")
    record(session, MID_JAN, tenant="t1")
    assert stored(session) == 1


def test_a_retry_of_an_event_stored_before_the_period_closed_is_still_a_duplicate(
    session, plan
) -> None:
    first = record(session, MID_JAN)
    generate(session)
    assert record(session, MID_JAN) == first
    assert stored(session) == 1


def test_a_batch_with_one_late_event_names_its_index_and_stores_nothing(session, plan) -> None:
    generate(session)
    batch = [
        {"metric": "tokens", "amount": 1, "at": FEB + timedelta(days=1), "idempotency_key": "a"},
        {"metric": "tokens", "amount": 1, "at": MID_JAN, "idempotency_key": "b"},
    ]
    with pytest.raises(PeriodClosedError, match=r"^events\[1\]: ") as caught:
        service(session).record_usage_batch(batch)
    assert caught.value.index == 1
    assert stored(session) == 0


def test_ignore_stores_late_usage_and_counts_each_new_event_once(session, plan) -> None:
    generate(session)
    before = ignored_total()
    record(session, MID_JAN, key="late", late_usage="ignore")
    record(session, MID_JAN, key="late", late_usage="ignore")  # a duplicate: not counted again
    record(session, FEB, key="on-time", late_usage="ignore")
    assert stored(session) == 2
    assert ignored_total() - before == 1


def test_next_invoice_stores_late_usage(session, plan) -> None:
    generate(session)
    before = ignored_total()
    record(session, MID_JAN, late_usage="next_invoice")
    assert stored(session) == 1
    assert ignored_total() == before


def test_a_later_finalized_period_does_not_close_an_earlier_open_one(session, plan) -> None:
    generate(session, start=FEB, end=MAR)
    record(session, MID_JAN)
    assert stored(session) == 1


def test_an_empty_batch_stores_nothing_under_reject(session, plan) -> None:
    generate(session)
    assert service(session).record_usage_batch([]) == []
