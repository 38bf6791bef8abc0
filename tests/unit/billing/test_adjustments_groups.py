"""LATE_USAGE=next_invoice, late usage with no line of its own on the finalized invoice: a metric
that had no usage, a new group of a metric per dimension, a group a dimensional price or the
fallback price bills. What January's period is billed in the end (its lines, the adjustments
billed for it, less the late-usage credits) equals, key by key, the January invoice of a tenant
that had all the usage on time; once. A catalog change after the invoice (a dimensional price
retired or added, a meter grouped anew) re-prices nothing. SQLite and PostgreSQL."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import or_, select

from billing import BillingService, InvoicePolicy
from billing.adjustments import LATE_USAGE_REASON
from billing.meters import declare_meter
from billing.models import CreditNote, CreditNoteLine, Invoice, InvoiceLine, Price
from tests.unit.billing.test_lifecycle import FEB, JAN, MAR
from tests.unit.billing.test_price_dimensions import plan_with, subscribe

APR = MAR.replace(month=4)
DAY = timedelta(days=1)
LOOKBACK = timedelta(days=100)
TIERS = [{"up_to": 100, "unit_amount_decimal": "2"}, {"up_to": None, "unit_amount_decimal": "1"}]
VOLUME = {"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": TIERS}
GRADUATED = {"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": TIERS}
GPT4_AT_3_ELSE_1 = (
    {"metric": "tokens", "unit_amount": 3, "dimensions": {"model": "gpt-4"}},
    {"metric": "tokens", "unit_amount": 1},
)

Use = tuple[str, int, dict[str, str]]  # metric, amount, metadata

# How the next invoice is made: finalized at once, or a draft re-priced when finalized.
NEXT = pytest.mark.parametrize("grace", [timedelta(0), 3 * DAY], ids=["at-once", "draft"])


def service(session, tenant: str, now, grace=timedelta(0)) -> BillingService:
    policy = InvoicePolicy(late_usage_lookback=LOOKBACK, grace_period=grace)
    return BillingService(session=session, tenant_id=tenant, now=lambda: now, policy=policy)


def record(session, tenant: str, at, uses: list[Use], batch: str) -> None:
    bs = service(session, tenant, APR)
    for index, (metric, amount, metadata) in enumerate(uses):
        bs.record_usage(
            metric=metric,
            amount=amount,
            at=at,
            idempotency_key=f"{batch}-{index}",
            metadata=metadata or None,
        )


def invoice(session, tenant: str, start, end, grace=timedelta(0)) -> Invoice:
    bs = service(session, tenant, end + DAY, grace)
    invoice_id = bs.generate_monthly_invoice(period_start=start, period_end=end, currency="usd")
    if grace:
        bs = service(session, tenant, end + DAY + grace, grace)
        assert bs.generate_monthly_invoice(period_start=start, period_end=end, currency="usd") == (
            invoice_id
        )  # the draft re-priced
        bs.finalize_invoice(invoice_id)
    found = session.get(Invoice, invoice_id)
    assert found is not None
    assert found.status == "open"
    return found


def key_of(session, line: InvoiceLine) -> tuple:
    price = session.get(Price, line.price_id)
    assert price is not None
    return (price.key, line.metric, tuple(sorted((line.dimensions or {}).items())))


def billed_for(session, january: Invoice) -> dict[tuple, tuple[int, int]]:
    """(quantity, amount) by (price key, metric, group) that January's period was billed: its
    usage lines, the adjustment lines for it, less the late credits on those; zeros left out."""
    lines = list(
        session.scalars(
            select(InvoiceLine).where(
                or_(
                    InvoiceLine.invoice_id == january.id,
                    InvoiceLine.adjusts_invoice_id == january.id,
                ),
                InvoiceLine.price_id.is_not(None),
                InvoiceLine.metric.is_not(None),
            )
        )
    )
    by_id = {line.id: line for line in lines}
    billed: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        billed[key_of(session, line)][0] += line.quantity
        billed[key_of(session, line)][1] += line.amount
    credits = session.execute(
        select(CreditNoteLine)
        .join(CreditNote)
        .where(
            CreditNote.reason == LATE_USAGE_REASON,
            CreditNoteLine.invoice_line_id.in_(list(by_id)),
        )
    ).scalars()
    for credit in credits:
        key = key_of(session, by_id[str(credit.invoice_line_id)])
        billed[key][0] += credit.quantity or 0
        billed[key][1] -= credit.amount
    return {key: (q, a) for key, (q, a) in billed.items() if (q, a) != (0, 0)}


def all_on_time(session, uses: list[Use]) -> dict[tuple, tuple[int, int]]:
    """What the January invoice of tenant `ref`, with all the usage on time, bills by key."""
    record(session, "ref", JAN + DAY, uses, "ref")
    january = invoice(session, "ref", JAN, FEB)
    return billed_for(session, january)


def adjustments_of(session, inv: Invoice) -> list[tuple]:
    rows = session.scalars(
        select(InvoiceLine).where(
            InvoiceLine.invoice_id == inv.id, InvoiceLine.kind == "adjustment"
        )
    )
    return sorted((*key_of(session, line), line.quantity, line.amount) for line in rows)


def late_credits(session) -> list[tuple]:
    rows = session.execute(
        select(CreditNote.invoice_id, CreditNoteLine.quantity, CreditNoteLine.amount)
        .join(CreditNoteLine)
        .where(CreditNote.reason == LATE_USAGE_REASON)
    )
    return sorted(tuple(row) for row in rows)


def billed_once_more(session, grace) -> None:
    """A retry of February and the next invoices bill nothing more and credit nothing."""
    before = (len(all_adjustment_lines(session)), late_credits(session))
    invoice(session, "t", FEB, MAR, grace)
    march = invoice(session, "t", MAR, APR, grace)
    assert adjustments_of(session, march) == []
    assert (len(all_adjustment_lines(session)), late_credits(session)) == before
    assert service(session, "t", APR + DAY).pending_adjustments(currency="usd") == []


def all_adjustment_lines(session) -> list[str]:
    return list(session.scalars(select(InvoiceLine.id).where(InvoiceLine.kind == "adjustment")))


def scenario(session, grace, on_time: list[Use], late: list[Use]) -> Invoice:
    """Tenant `t` uses `on_time` in January, its January invoice is finalized, `late` arrives
    dated January; February's invoice is made. Returns February's invoice, after checking that
    January's period is billed what `ref`'s January with all the usage is."""
    record(session, "t", JAN + DAY, on_time, "on-time")
    january = invoice(session, "t", JAN, FEB)
    record(session, "t", JAN + 20 * DAY, late, "late")
    february = invoice(session, "t", FEB, MAR, grace)
    assert billed_for(session, january) == all_on_time(session, on_time + late)
    return february


def subscribe_both(session, plan) -> None:
    subscribe(session, plan, start=JAN, tenant="t")
    subscribe(session, plan, start=JAN, tenant="ref")


@NEXT
@pytest.mark.parametrize("grouped", [False, True], ids=["no-meter", "group-by-region"])
def test_late_usage_of_a_metric_without_usage_on_the_finalized_invoice_is_billed(
    session, grace, grouped
) -> None:
    if grouped:
        declare_meter(session, key="calls", group_by=["region"])
    plan = plan_with(
        session,
        "p",
        {"metric": "tokens", "unit_amount": 2},
        {"metric": "calls", "unit_amount": 5},
    )
    subscribe_both(session, plan)
    region = {"region": "eu"} if grouped else {}
    february = scenario(session, grace, [("tokens", 10, {})], [("calls", 3, region)])
    group = (("region", "eu"),) if grouped else ()
    assert adjustments_of(session, february) == [("p-1", "calls", group, 3, 15)]
    billed_once_more(session, grace)


@NEXT
def test_late_usage_of_a_new_group_of_a_metric_per_dimension_is_billed(session, grace) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(session, "p", {"metric": "tokens", **GRADUATED})
    subscribe_both(session, plan)
    on_time: list[Use] = [("tokens", 90, {"model": "gpt-3"})]
    late: list[Use] = [("tokens", 20, {"model": "gpt-3"}), ("tokens", 110, {"model": "gpt-4"})]
    february = scenario(session, grace, on_time, late)
    # gpt-3: 110 units cost 210, 180 billed; gpt-4: 110 units cost 100 × 2 + 10 × 1
    assert adjustments_of(session, february) == [
        ("p-0", "tokens", (("model", "gpt-3"),), 20, 30),
        ("p-0", "tokens", (("model", "gpt-4"),), 110, 210),
    ]
    billed_once_more(session, grace)


@NEXT
@pytest.mark.parametrize("group_by", [["model"], ["model", "region"]])
def test_late_groups_are_billed_by_the_dimensional_price_or_the_fallback(
    session, grace, group_by
) -> None:
    declare_meter(session, key="tokens", group_by=group_by)
    plan = plan_with(session, "ai", *GPT4_AT_3_ELSE_1)
    subscribe_both(session, plan)
    eu = {"region": "eu"} if "region" in group_by else {}
    on_time: list[Use] = [("tokens", 10, {"model": "claude", **eu})]
    late: list[Use] = [
        ("tokens", 5, {"model": "gpt-4", **eu}),  # the dimensional price's group
        ("tokens", 7, {"model": "mistral", **eu}),  # a new group of the fallback
        ("tokens", 2, {"model": "claude", **eu}),  # a group billed on time
    ]
    february = scenario(session, grace, on_time, late)
    region = (("region", "eu"),) if eu else ()
    assert adjustments_of(session, february) == [
        ("ai-0", "tokens", (("model", "gpt-4"), *region), 5, 15),
        ("ai-1", "tokens", (("model", "claude"), *region), 2, 2),
        ("ai-1", "tokens", (("model", "mistral"), *region), 7, 7),
    ]
    billed_once_more(session, grace)


@NEXT
def test_a_negative_difference_of_a_new_group_is_credited_on_its_adjustment_line(
    session, grace
) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(session, "p", {"metric": "tokens", **VOLUME})
    subscribe_both(session, plan)
    february = scenario(
        session, grace, [("tokens", 5, {"model": "a"})], [("tokens", 100, {"model": "b"})]
    )
    [(*_, quantity, amount)] = adjustments_of(session, february)
    assert (quantity, amount) == (100, 200)
    record(session, "t", JAN + 21 * DAY, [("tokens", 1, {"model": "b"})], "crossing")
    invoice(session, "t", MAR, APR, grace)  # 101 units at 1: 99 less, on February's line
    assert late_credits(session) == [(february.id, 1, 99)]
    january = session.scalar(
        select(Invoice).where(Invoice.tenant_id == "t", Invoice.period_start == JAN)
    )
    assert billed_for(session, january) == {
        ("p-0", "tokens", (("model", "a"),)): (5, 10),
        ("p-0", "tokens", (("model", "b"),)): (101, 101),
    }
    invoice(session, "t", APR, APR.replace(month=5), grace)
    assert late_credits(session) == [(february.id, 1, 99)]


def test_a_price_added_to_the_plan_after_the_invoice_does_not_re_price_its_period(
    session,
) -> None:
    plan = plan_with(session, "p", {"metric": "tokens", "unit_amount": 2})
    subscribe(session, plan, start=JAN, tenant="t")
    record(session, "t", JAN + DAY, [("calls", 4, {})], "on-time")  # unpriced in January
    invoice(session, "t", JAN, FEB)
    session.add(
        Price(key="p-calls", plan_id=plan.id, currency="usd", metric="calls", unit_amount=5)
    )
    record(session, "t", JAN + 20 * DAY, [("calls", 1, {})], "late")
    # the period's calls were billed by no price: a new price (or a new version of one, as
    # `billing catalog apply` makes) bills from the next invoice on, not January again
    assert service(session, "t", FEB + DAY).pending_adjustments(currency="usd") == []


def nothing_pending(session) -> None:
    assert service(session, "t", FEB + DAY).pending_adjustments(currency="usd") == []


def test_a_retired_dimensional_price_s_group_is_not_billed_again_by_the_fallback(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(session, "ai", *GPT4_AT_3_ELSE_1)
    subscribe(session, plan, start=JAN, tenant="t")
    record(session, "t", JAN + DAY, [("tokens", 10, {"model": "gpt-4"})], "on-time")
    invoice(session, "t", JAN, FEB)  # gpt-4 at 3: 30
    session.scalar(select(Price).where(Price.key == "ai-0")).plan_id = None  # retired
    session.flush()
    nothing_pending(session)  # the fallback now bills gpt-4: not a group first used late


def test_a_new_dimensional_price_neither_bills_nor_credits_the_period(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(session, "ai", {"metric": "tokens", "unit_amount": 1})
    subscribe(session, plan, start=JAN, tenant="t")
    record(session, "t", JAN + DAY, [("tokens", 10, {"model": "gpt-4"})], "on-time")
    invoice(session, "t", JAN, FEB)  # gpt-4 at 1: 10
    session.add(Price(key="gpt4", plan_id=plan.id, currency="usd", **GPT4_AT_3_ELSE_1[0]))
    session.flush()
    nothing_pending(session)  # the fallback bills gpt-4 no more: not a credit of January's


def test_a_meter_grouped_after_the_invoice_does_not_bill_its_groups_again(session) -> None:
    plan = plan_with(session, "p", {"metric": "tokens", "unit_amount": 2})
    subscribe(session, plan, start=JAN, tenant="t")
    record(session, "t", JAN + DAY, [("tokens", 10, {"model": "a"})], "on-time")
    invoice(session, "t", JAN, FEB)  # 10 tokens, no group: 20
    declare_meter(session, key="tokens", group_by=["model"])
    nothing_pending(session)  # {"model": "a"} is January's usage grouped anew, not late usage
