"""LATE_USAGE=next_invoice: late usage of a finalized invoice becomes an adjustment line of the
tenant's next invoice (tiered prices bill the difference), a negative difference a credit note
on the finalized invoice; each exactly once. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from billing import BillingService, InvoicePolicy
from billing.models import CreditNote, CreditNoteLine, Invoice, InvoiceLine, Plan, Price
from tests.unit.billing.test_lifecycle import FEB, JAN, MAR, events
from tests.unit.billing.test_lifecycle import plan as plan

APR = MAR.replace(month=4)
DAY = timedelta(days=1)


def service(session, now, tenant="t1", **policy) -> BillingService:
    return BillingService(
        session=session, tenant_id=tenant, now=lambda: now, policy=InvoicePolicy(**policy)
    )


def use(session, amount, at, key, tenant="t1") -> None:
    service(session, APR, tenant).record_usage(
        metric="tokens", amount=amount, at=at, idempotency_key=key
    )


def invoice(session, start, end, now=None, tenant="t1", **policy) -> Invoice:
    invoice_id = service(session, now or end + DAY, tenant, **policy).generate_monthly_invoice(
        period_start=start, period_end=end, currency="usd"
    )
    return session.get(Invoice, invoice_id)


def lines(session, inv) -> list[tuple]:
    rows = session.execute(select(InvoiceLine).where(InvoiceLine.invoice_id == inv.id)).scalars()
    return sorted(
        (line.kind, line.metric or "", line.quantity, line.amount, line.adjusts_invoice_id)
        for line in rows
    )


def adjustment_lines(session) -> list[tuple]:
    rows = session.execute(select(InvoiceLine).where(InvoiceLine.kind == "adjustment")).scalars()
    return sorted((line.invoice_id, line.quantity, line.amount) for line in rows)


def credit_notes(session) -> list[tuple]:
    rows = session.execute(
        select(CreditNote.invoice_id, CreditNote.amount, CreditNoteLine.quantity).join(
            CreditNoteLine
        )
    )
    return sorted(tuple(row) for row in rows)


def test_late_usage_becomes_an_adjustment_line_of_the_next_invoice(session, plan) -> None:
    use(session, 100, JAN + 5 * DAY, "on-time")
    january = invoice(session, JAN, FEB)
    assert january.total_amount == 1200
    use(session, 10, JAN + 20 * DAY, "late")
    february = invoice(session, FEB, MAR)
    assert lines(session, february) == [
        ("adjustment", "tokens", 10, 20, january.id),
        ("charge", "", 1, 1000, None),
        ("charge", "tokens", 0, 0, None),
    ]
    assert february.total_amount == 1020
    assert (january.total_amount, lines(session, january)) == (
        1200,
        [("charge", "", 1, 1000, None), ("charge", "tokens", 100, 200, None)],
    )


def test_an_adjustment_is_billed_once_however_often_invoices_are_generated(session, plan) -> None:
    long = {"late_usage_lookback": timedelta(days=100)}
    january = invoice(session, JAN, FEB, **long)
    use(session, 10, JAN + 20 * DAY, "late")
    february = invoice(session, FEB, MAR, **long)
    assert invoice(session, FEB, MAR, **long).id == february.id  # a retry
    march = invoice(session, MAR, APR, **long)
    assert adjustment_lines(session) == [(february.id, 10, 20)]
    assert march.total_amount == 1000
    use(session, 5, JAN + 21 * DAY, "later still")
    april = invoice(session, APR, APR.replace(month=5), **long)
    assert adjustment_lines(session) == sorted([(february.id, 10, 20), (april.id, 5, 10)])
    assert april.total_amount == 1010
    assert january.total_amount == 1000


def test_an_event_at_the_period_end_is_the_next_period_s_usage_not_late(session, plan) -> None:
    invoice(session, JAN, FEB)
    use(session, 10, FEB, "at-the-end")
    february = invoice(session, FEB, MAR)
    assert lines(session, february) == [
        ("charge", "", 1, 1000, None),
        ("charge", "tokens", 10, 20, None),
    ]


@pytest.mark.parametrize(
    ("after", "billed"), [(timedelta(0), True), (timedelta(microseconds=1), False)]
)
def test_the_lookback_reaches_invoices_whose_period_ended_exactly_that_long_ago(
    session, plan, after, billed
) -> None:
    invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    now = FEB + timedelta(days=35) + after
    february = invoice(session, FEB, MAR, now=now)
    assert (february.total_amount == 1020) is billed


def test_the_lookback_is_the_policy_s(session, plan) -> None:
    invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    february = invoice(session, FEB, MAR, now=MAR + DAY, late_usage_lookback=20 * DAY)
    assert february.total_amount == 1000  # the default 35 days would have billed it


def tiered_tiers() -> list[dict]:
    return [
        {"up_to": 100, "unit_amount_decimal": "2"},
        {"up_to": None, "unit_amount_decimal": "1"},
    ]


def tiered_plan(session, mode: str) -> None:
    """Tenant t9: 2 a unit up to 100 units, 1 a unit beyond (`graduated` or `volume`)."""
    plan = Plan(key=f"tiered-{mode}", name="Tiered")
    session.add(plan)
    session.flush()
    session.add(
        Price(
            key=f"tokens-{mode}",
            plan_id=plan.id,
            currency="usd",
            metric="tokens",
            billing_scheme="tiered",
            tiers_mode=mode,
            tiers=tiered_tiers(),
        )
    )
    from billing.models import Subscription

    session.add(Subscription(tenant_id="t9", plan_id=plan.id, effective_at=JAN))
    session.flush()


def test_graduated_tiers_bill_the_price_of_the_new_total_less_the_old(session) -> None:
    tiered_plan(session, "graduated")
    use(session, 90, JAN + 5 * DAY, "on-time", tenant="t9")
    january = invoice(session, JAN, FEB, tenant="t9")
    assert january.total_amount == 180
    use(session, 20, JAN + 20 * DAY, "late", tenant="t9")
    february = invoice(session, FEB, MAR, tenant="t9")
    # 110 units cost 100 × 2 + 10 × 1 = 210: 30 more, not 20 × 2 nor 20 × 1
    assert ("adjustment", "tokens", 20, 30, january.id) in lines(session, february)


def test_a_negative_difference_is_a_credit_note_on_the_finalized_invoice_once(session) -> None:
    tiered_plan(session, "volume")
    use(session, 100, JAN + 5 * DAY, "on-time", tenant="t9")
    january = invoice(session, JAN, FEB, tenant="t9")
    assert january.total_amount == 200
    use(session, 10, JAN + 20 * DAY, "late", tenant="t9")
    february = invoice(session, FEB, MAR, tenant="t9")
    # 110 units all at 1 cost 110: 90 less than billed
    assert adjustment_lines(session) == []
    assert february.total_amount == 0
    assert credit_notes(session) == [(january.id, 90, 10)]
    [(_, note)] = events(session, "billing.credit_note.created")
    assert (note["invoice_id"], note["amount"]) == (january.id, 90)
    invoice(session, MAR, APR, tenant="t9")
    assert credit_notes(session) == [(january.id, 90, 10)]
    assert january.total_amount == 200  # the invoice itself never changes
    [credited] = session.scalars(select(CreditNoteLine))
    [tokens] = [line for line in january.lines if line.metric == "tokens"]
    assert (credited.invoice_line_id, credited.description) == (
        tokens.id,
        "late usage of tokens: +10",
    )


def test_a_credit_goes_by_the_finalized_invoice_s_status_now_not_as_the_session_loaded_it(
    session, session_factory
) -> None:
    tiered_plan(session, "volume")
    use(session, 100, JAN + 5 * DAY, "on-time", tenant="t9")
    january = invoice(session, JAN, FEB, tenant="t9")
    use(session, 10, JAN + 20 * DAY, "late", tenant="t9")
    session.commit()  # january stays loaded as it was: the factory does not expire on commit
    with session_factory.begin() as other:
        service(other, MAR, "t9").mark_uncollectible(january.id)
    assert january.status == "open"
    invoice(session, FEB, MAR, tenant="t9")
    # the 90 less is not credited on an uncollectible invoice: it stays pending
    assert credit_notes(session) == []
    assert january.status == "uncollectible"


def test_ignore_bills_late_usage_nowhere(session, plan) -> None:
    invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    assert invoice(session, FEB, MAR, late_usage="ignore").total_amount == 1000
    assert adjustment_lines(session) == []


def test_another_tenant_s_late_usage_adjusts_nothing_of_this_one(session, plan) -> None:
    invoice(session, JAN, FEB, tenant="t1")
    invoice(session, JAN, FEB, tenant="t2")
    use(session, 10, JAN + 20 * DAY, "late", tenant="t2")
    assert invoice(session, FEB, MAR, tenant="t1").total_amount == 1000
    assert invoice(session, FEB, MAR, tenant="t2").total_amount == 1020


def test_a_draft_next_invoice_carries_the_adjustment_once_while_re_priced(session, plan) -> None:
    grace = {"grace_period": 3 * DAY}
    january = invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    draft = invoice(session, FEB, MAR, **grace)
    assert draft.status == "draft"
    assert ("adjustment", "tokens", 10, 20, january.id) in lines(session, draft)
    use(session, 5, JAN + 21 * DAY, "later")
    assert invoice(session, FEB, MAR, **grace).id == draft.id  # re-priced
    assert [line for line in lines(session, draft) if line[0] == "adjustment"] == [
        ("adjustment", "tokens", 15, 30, january.id)
    ]
    finalized = service(session, MAR + DAY, **grace).finalize_invoice(draft.id)
    assert (finalized.status, finalized.total_amount) == ("open", 1030)


def test_a_voided_next_invoice_frees_its_adjustments_for_the_reissue(session, plan) -> None:
    january = invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    february = invoice(session, FEB, MAR)
    service(session, MAR + DAY).void_invoice(february.id)
    reissued = invoice(session, FEB, MAR)
    assert reissued.id != february.id
    assert ("adjustment", "tokens", 10, 20, january.id) in lines(session, reissued)


def test_a_reissued_period_is_credited_what_was_billed_for_its_void_predecessor(
    session, plan
) -> None:
    january = invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    invoice(session, FEB, MAR)  # bills the 10 late units of January: 20
    service(session, MAR + DAY).void_invoice(january.id)
    reissued = invoice(session, JAN, FEB, now=MAR + DAY)  # bills all 10 again: 1020
    assert reissued.total_amount == 1020
    invoice(session, MAR, APR, late_usage_lookback=timedelta(days=70))
    # 20 back for the 10 units billed twice (on February and on the reissue): -10 units
    assert credit_notes(session) == [(reissued.id, 20, -10)]


def test_a_period_reissued_after_the_lookback_is_credited_once_by_the_next_invoice(
    session, plan
) -> None:
    """Under the default lookback: January's period ended 60 days before April 2nd, but its
    reissue was finalized 31 days before."""
    january = invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    february = invoice(session, FEB, MAR)  # bills the 10 late units of January: 20
    service(session, MAR + DAY).void_invoice(january.id)
    reissued = invoice(session, JAN, FEB, now=MAR + DAY)  # bills all 10 again: 1020
    march = invoice(session, MAR, APR)
    april = invoice(session, APR, APR.replace(month=5))
    assert credit_notes(session) == [(reissued.id, 20, -10)]
    assert adjustment_lines(session) == [(february.id, 10, 20)]
    totals = [i.total_amount for i in (january, february, reissued, march, april)]
    assert totals == [1000, 1020, 1020, 1000, 1000]


def test_pending_adjustments_and_the_preview_show_the_adjustment_and_store_nothing(
    session, plan
) -> None:
    january = invoice(session, JAN, FEB)
    use(session, 10, JAN + 20 * DAY, "late")
    bs = service(session, FEB + 10 * DAY)
    [pending] = bs.pending_adjustments(currency="USD")
    assert (pending.adjusts_invoice_id, pending.metric, pending.quantity, pending.amount) == (
        january.id,
        "tokens",
        10,
        20,
    )
    preview = bs.preview_upcoming_invoice(currency="usd")
    assert preview.total_amount == 1020
    assert [(line.kind, line.amount) for line in preview.lines if line.kind == "adjustment"] == [
        ("adjustment", 20)
    ]
    assert adjustment_lines(session) == []
    assert (
        service(session, FEB + 10 * DAY, late_usage="ignore").pending_adjustments(currency="usd")
        == []
    )


def test_late_usage_of_a_price_per_dimension_adjusts_that_group_only(session) -> None:
    from billing.meters import declare_meter
    from tests.unit.billing.test_price_dimensions import plan_with, subscribe

    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(
        session,
        "ai",
        {"metric": "tokens", "unit_amount": 3, "dimensions": {"model": "gpt-4"}},
        {"metric": "tokens", "unit_amount": 1},
    )
    subscribe(session, plan, start=JAN, tenant="t7")
    bs = service(session, APR, "t7")
    for key, model in [("a", "gpt-4"), ("b", "claude"), ("c", "mistral")]:
        bs.record_usage(
            metric="tokens", amount=10, at=JAN + DAY, idempotency_key=key, metadata={"model": model}
        )
    january = invoice(session, JAN, FEB, tenant="t7")
    assert january.total_amount == 50
    [claude] = [line for line in january.lines if line.dimensions == {"model": "claude"}]
    claude.created_at -= timedelta(seconds=1)  # first of its price: mistral's is its own still
    for amount, model in [(5, "gpt-4"), (2, "mistral")]:  # mistral: the default price's second
        bs.record_usage(
            metric="tokens",
            amount=amount,
            at=JAN + 20 * DAY,
            idempotency_key=f"late {model}",
            metadata={"model": model},
        )
    february = invoice(session, FEB, MAR, tenant="t7")
    adjusted = [
        (line.quantity, line.amount, line.dimensions, line.adjusts_invoice_id)
        for line in session.execute(
            select(InvoiceLine).where(
                InvoiceLine.invoice_id == february.id, InvoiceLine.kind == "adjustment"
            )
        ).scalars()
    ]
    assert sorted(adjusted, key=repr) == [
        (2, 2, {"model": "mistral"}, january.id),
        (5, 15, {"model": "gpt-4"}, january.id),
    ]


def test_a_negative_difference_on_a_fully_credited_invoice_stays_pending(session) -> None:
    tiered_plan(session, "volume")
    use(session, 100, JAN + 5 * DAY, "on-time", tenant="t9")
    january = invoice(session, JAN, FEB, tenant="t9")
    service(session, FEB + DAY, "t9").create_credit_note(january.id, amount=200, reason="goodwill")
    use(session, 10, JAN + 20 * DAY, "late", tenant="t9")
    invoice(session, FEB, MAR, tenant="t9")
    assert list(session.scalars(select(CreditNote.reason))) == ["goodwill"]  # nothing left
    [pending] = service(session, MAR + DAY, "t9").pending_adjustments(currency="usd")
    assert (pending.quantity, pending.amount) == (10, -90)


def test_late_usage_of_a_price_retired_from_the_plan_is_not_re_priced(session, plan) -> None:
    session.add(Price(key="calls", plan_id=plan.id, currency="usd", metric="calls", unit_amount=5))
    january = invoice(session, JAN, FEB)
    for line in january.lines:  # the retired price's line first: the others are still looked at
        line.created_at -= timedelta(seconds=1) if line.metric == "tokens" else timedelta(0)
    use(session, 10, JAN + 20 * DAY, "late")
    service(session, APR).record_usage(
        metric="calls", amount=2, at=JAN + 20 * DAY, idempotency_key="late calls"
    )
    tokens = session.scalar(select(Price).where(Price.key == "tokens"))
    tokens.plan_id = None  # what `billing catalog apply` does to a price's old version
    session.flush()
    [pending] = service(session, FEB + DAY).pending_adjustments(currency="usd")
    assert (pending.metric, pending.quantity, pending.amount) == ("calls", 2, 10)


def late_credits(session) -> list[tuple]:
    """(invoice, amount, credited line, late units) of each late-usage credit note line."""
    rows = session.execute(
        select(CreditNote.invoice_id, CreditNoteLine.amount, CreditNoteLine.invoice_line_id)
        .add_columns(CreditNoteLine.quantity)
        .join(CreditNoteLine)
        .where(CreditNote.reason == "late usage re-priced")
    )
    return sorted(tuple(row) for row in rows)


LONG = {"tenant": "t9", "late_usage_lookback": timedelta(days=100)}


def two_carriers_then_a_crossing(
    session, goodwill: int
) -> tuple[Invoice, InvoiceLine, InvoiceLine]:
    """January (40 units at 2: 80, `goodwill` credited), two invoices that each billed 30 late
    units of it (+60; the newer 25 credited on that line, the older 50), then one late unit
    that crosses into the volume tier of 1 a unit: January's usage now bills 99 less.
    Returns January and the newer and the older adjustment line."""
    tiered_plan(session, "volume")
    use(session, 40, JAN + 5 * DAY, "on-time", tenant="t9")
    january = invoice(session, JAN, FEB, **LONG)
    service(session, FEB + DAY, "t9").create_credit_note(january.id, amount=goodwill, reason="gw")
    carriers = []  # each bills 30 late units of January (+60) and 10 units of its own (20)
    for start, end in [(FEB, MAR), (MAR, APR)]:
        use(session, 30, JAN + 20 * DAY, f"late {start}", tenant="t9")
        use(session, 10, start + DAY, f"own {start}", tenant="t9")
        carriers.append(invoice(session, start, end, **LONG))
    assert [carrier.total_amount for carrier in carriers] == [80, 80]
    older, newer = sorted(
        session.scalars(select(InvoiceLine).where(InvoiceLine.kind == "adjustment")),
        key=lambda line: line.id,
    )
    newer.created_at = older.created_at + timedelta(seconds=1)  # newest first, whatever the ids
    session.flush()
    on_line = [{"amount": 25, "invoice_line_id": newer.id}]
    service(session, APR, "t9").create_credit_note(newer.invoice_id, lines=on_line, reason="x")
    service(session, APR, "t9").create_credit_note(older.invoice_id, amount=50, reason="y")
    use(session, 1, JAN + 21 * DAY, "crossing", tenant="t9")  # 101 units at 1: 99 less
    invoice(session, APR, APR.replace(month=5), **LONG)
    return january, newer, older


def pending_of_t9(session) -> list[tuple]:
    policy = {"late_usage_lookback": LONG["late_usage_lookback"]}
    pending = service(session, APR, "t9", **policy).pending_adjustments(currency="usd")
    return [(a.adjusts_invoice_id, a.quantity, a.amount) for a in pending]


def test_what_the_invoice_cannot_take_is_credited_on_the_invoices_that_billed_its_adjustments(
    session,
) -> None:
    january, newer, older = two_carriers_then_a_crossing(session, goodwill=80)
    # January took nothing more; the newer line 60 - 25; the older invoice 80 - 50.
    assert late_credits(session) == sorted(
        [(newer.invoice_id, 35, newer.id, 1), (older.invoice_id, 30, older.id, 0)]
    )
    assert pending_of_t9(session) == [(january.id, 0, -34)]


def test_a_credit_that_leaves_one_cent_goes_on_to_the_next_invoice(session) -> None:
    january, newer, older = two_carriers_then_a_crossing(session, goodwill=17)
    january_line = session.scalars(
        select(InvoiceLine.id).where(InvoiceLine.invoice_id == january.id)
    ).one()
    # 99: January's 63 left, the newer line's 35, then the one cent left on the older invoice.
    assert late_credits(session) == sorted(
        [
            (january.id, 63, january_line, 1),
            (newer.invoice_id, 35, newer.id, 0),
            (older.invoice_id, 1, older.id, 0),
        ]
    )
    assert pending_of_t9(session) == []


def test_only_open_or_paid_invoices_that_billed_adjustments_for_its_period_are_credited(
    session,
) -> None:
    long = {"tenant": "t9", "late_usage_lookback": timedelta(days=100)}
    tiered_plan(session, "volume")
    use(session, 40, JAN + 5 * DAY, "on-time", tenant="t9")
    january = invoice(session, JAN, FEB, **long)
    service(session, FEB + DAY, "t9").create_credit_note(january.id, amount=80, reason="goodwill")
    use(session, 30, JAN + 20 * DAY, "late 1", tenant="t9")
    february = invoice(session, FEB, MAR, **long)  # +60 for January
    service(session, MAR, "t9").mark_uncollectible(february.id)
    use(session, 30, JAN + 20 * DAY, "late 2", tenant="t9")
    use(session, 5, FEB + 20 * DAY, "late for february", tenant="t9")
    march = invoice(session, MAR, APR, **long)  # +60 for January, +10 for February
    assert lines(session, march) == [
        ("adjustment", "tokens", 5, 10, february.id),
        ("adjustment", "tokens", 30, 60, january.id),
        ("charge", "tokens", 0, 0, None),
    ]
    use(session, 1, JAN + 21 * DAY, "crossing", tenant="t9")  # 101 units at 1: 99 less
    invoice(session, APR, APR.replace(month=5), **long)
    [(invoice_id, amount, line_id, units)] = late_credits(session)
    assert (invoice_id, amount, units) == (march.id, 60, 1)
    assert session.get(InvoiceLine, line_id).adjusts_invoice_id == january.id
    service(session, APR, "t9").void_invoice(march.id)  # its adjustments and credit no longer count
    pending = service(session, APR, "t9", late_usage_lookback=timedelta(days=100))
    # 101 units cost 101, January and February billed 80 + 60 for them; 101 - 40 - 30 late units
    assert [(a.quantity, a.amount) for a in pending.pending_adjustments(currency="usd")] == [
        (31, -39),
        (5, 10),  # February's late 5 units, billed on March no more
    ]


def test_pending_adjustments_are_listed_oldest_period_first(session, plan) -> None:
    february = invoice(session, FEB, MAR)  # stored first
    january = invoice(session, JAN, FEB)
    use(session, 10, FEB + 20 * DAY, "late february")
    use(session, 10, JAN + 20 * DAY, "late january")
    pending = service(session, MAR + DAY).pending_adjustments(currency="usd")
    assert [a.adjusts_invoice_id for a in pending] == [january.id, february.id]


@pytest.mark.parametrize(
    ("mode", "on_time", "late", "billed", "credited"),
    [
        ("graduated", 100, 1, [1, 1], []),  # 100 units cost 200, 101 cost 201
        ("volume", 51, 50, [], [1, 1]),  # 51 units cost 102, 101 cost 101
    ],
)
def test_each_invoice_s_difference_of_a_cent_is_billed_or_credited(
    session, mode, on_time, late, billed, credited
) -> None:
    long = {"tenant": "t9", "late_usage_lookback": timedelta(days=100)}
    tiered_plan(session, mode)
    for start, end in [(JAN, FEB), (FEB, MAR)]:
        use(session, on_time, start + 5 * DAY, f"on-time {start}", tenant="t9")
        invoice(session, start, end, **long)
    for start in (JAN, FEB):
        use(session, late, start + 20 * DAY, f"late {start}", tenant="t9")
    invoice(session, MAR, APR, **long)
    assert [amount for _, _, amount in adjustment_lines(session)] == billed
    assert [amount for _, amount, _ in credit_notes(session)] == credited


def test_a_draft_re_priced_leaves_out_what_another_invoice_billed_for_the_period(
    session, plan
) -> None:
    long = {"late_usage_lookback": timedelta(days=100)}
    invoice(session, JAN, FEB, **long)
    use(session, 10, JAN + 20 * DAY, "late")
    february = invoice(session, FEB, MAR, **long)  # bills the 10 late units: 20
    draft = invoice(session, MAR, APR, grace_period=3 * DAY, **long)
    finalized = service(session, APR + DAY, **long).finalize_invoice(draft.id)  # re-priced
    assert adjustment_lines(session) == [(february.id, 10, 20)]
    assert finalized.total_amount == 1000


def test_late_usage_under_a_plan_taken_twice_in_a_period_re_prices_both_lines(session) -> None:
    from billing.models import Subscription

    tiered_plan(session, "volume")  # t9 from January
    [first] = session.scalars(select(Subscription).where(Subscription.tenant_id == "t9"))
    first.ended_at = JAN + 10 * DAY
    session.add(Subscription(tenant_id="t9", plan_id=first.plan_id, effective_at=JAN + 10 * DAY))
    use(session, 40, JAN + 5 * DAY, "first", tenant="t9")  # 80
    use(session, 60, JAN + 15 * DAY, "second", tenant="t9")  # 120
    january = invoice(session, JAN, FEB, tenant="t9")
    earlier, later = sorted((line for line in january.lines), key=lambda line: line.id)
    later.created_at = earlier.created_at - timedelta(seconds=1)  # first, whatever the ids
    use(session, 50, JAN + 20 * DAY, "late", tenant="t9")  # the second's 110 units cost 110
    invoice(session, FEB, MAR, tenant="t9")
    [credited] = session.scalars(select(CreditNoteLine))
    assert (credited.amount, credited.quantity) == (10, 50)
    assert credited.invoice_line_id == later.id  # the key's first line


def test_a_negative_difference_of_one_group_is_credited_on_that_group_s_adjustment_lines(
    session,
) -> None:
    from billing.meters import declare_meter
    from tests.unit.billing.test_price_dimensions import plan_with, subscribe

    long = {"tenant": "t7", "late_usage_lookback": timedelta(days=200)}
    declare_meter(session, key="tokens", group_by=["model"])
    volume = {"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": tiered_tiers()}
    plan = plan_with(
        session,
        "ai",
        {"metric": "tokens", "dimensions": {"model": "gpt-4"}, **volume},
        {"metric": "tokens", "unit_amount": 1},
    )
    subscribe(session, plan, start=JAN, tenant="t7")
    bs = service(session, APR, "t7")

    def use_model(amount: int, at, key: str, model: str) -> None:
        bs.record_usage(
            metric="tokens", amount=amount, at=at, idempotency_key=key, metadata={"model": model}
        )

    use_model(40, JAN + DAY, "on-time", "gpt-4")
    use_model(5, JAN + DAY, "on-time claude", "claude")
    january = invoice(session, JAN, FEB, **long)  # 80 + 5
    bs.create_credit_note(january.id, amount=85, reason="goodwill")
    use_model(60, JAN + 20 * DAY, "late gpt-4", "gpt-4")
    february = invoice(session, FEB, MAR, **long)  # +120 for gpt-4
    use_model(30, JAN + 20 * DAY, "late claude", "claude")
    invoice(session, MAR, APR, **long)  # +30 for claude: the newer adjustment line
    use_model(1, JAN + 21 * DAY, "crossing", "gpt-4")  # 101 units at 1: 99 less
    for start in (APR, APR.replace(month=5)):  # the second finds nothing left to credit
        invoice(session, start, start.replace(month=start.month + 1), **long)
    [(invoice_id, amount, line_id, units)] = late_credits(session)
    assert (invoice_id, amount, units) == (february.id, 99, 1)
    assert session.get(InvoiceLine, line_id).dimensions == {"model": "gpt-4"}


def test_an_unpriced_line_on_the_invoice_leaves_its_earlier_adjustments_counted(
    session, plan
) -> None:
    long = {"late_usage_lookback": timedelta(days=100)}
    use(session, 100, JAN + 5 * DAY, "on-time")
    service(session, APR).record_usage(
        metric="calls", amount=3, at=JAN + 5 * DAY, idempotency_key="unpriced"
    )
    january = invoice(session, JAN, FEB, **long)
    use(session, 10, JAN + 20 * DAY, "late-1")
    invoice(session, FEB, MAR, **long)
    use(session, 5, JAN + 21 * DAY, "late-2")
    march = invoice(session, MAR, APR, **long)
    assert ("adjustment", "tokens", 5, 10, january.id) in lines(session, march)
    assert sorted((q, a) for _, q, a in adjustment_lines(session)) == [(5, 10), (10, 20)]
