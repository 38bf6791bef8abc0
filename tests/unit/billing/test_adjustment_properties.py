"""Late usage invariant over random tiers, groups and late batches, on SQLite and PostgreSQL:
once the invoices after January exist, what January's own lines and the adjustments billed for
it, less the late-usage credit notes (on January or on the invoices carrying its adjustments),
add up to is, per price and group, the price of all of January's usage of that group now
(groups first seen late included)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from billing import BillingService, InvoicePolicy
from billing.meters import declare_meter
from billing.models import Invoice, Plan, Price, Subscription
from billing.pricing import usage_amount
from tests.unit.billing.test_adjustments_groups import billed_for

MONTHS = [datetime(2025, month, 1, tzinfo=UTC) for month in range(1, 7)]
POLICY = InvoicePolicy(late_usage_lookback=timedelta(days=200))
Use = tuple[int, str | None]  # amount, model
amounts = st.lists(st.tuples(st.integers(0, 300), st.sampled_from(["a", "b", None])), max_size=3)


def plan(session, mode: str, up_to: int, prices: tuple[int, int], gpt: int | None) -> list[Price]:
    """The tiered price of every group, then, with `gpt`, the price of model "a" at `gpt`."""
    plan = Plan(key="p", name="P")
    session.add(plan)
    session.flush()
    tiers = [
        {"up_to": up_to, "unit_amount_decimal": str(prices[0])},
        {"up_to": None, "unit_amount_decimal": str(prices[1])},
    ]
    tiered = Price(
        key="tok",
        plan_id=plan.id,
        currency="usd",
        metric="tokens",
        billing_scheme="tiered",
        tiers_mode=mode,
        tiers=tiers,
    )
    chosen = [tiered]
    if gpt is not None:
        dims = {"model": "a"}
        fields = {"currency": "usd", "metric": "tokens", "unit_amount": gpt, "dimensions": dims}
        chosen.append(Price(key="a", plan_id=plan.id, **fields))
    session.add_all([*chosen, Subscription(tenant_id="t", plan_id=plan.id, effective_at=MONTHS[0])])
    session.flush()
    return chosen


def recomputed(prices: list[Price], uses: list[Use], grouped: bool) -> dict[tuple, int]:
    """The amount by (price key, metric, group) of all the usage, computed in Python."""
    totals: dict[str | None, int] = defaultdict(int)
    for amount, model in uses:
        totals[model if grouped else None] += amount
    expected = {}
    for model, total in totals.items():
        price = prices[-1] if model == "a" else prices[0]
        group = (("model", model),) if grouped else ()
        expected[price.key, "tokens", group] = usage_amount(price, total)
    return {key: amount for key, amount in expected.items() if amount}


def amounts_billed(session, january: Invoice) -> dict[tuple, int]:
    """What January's period was billed by key (a late quantity priced at 0 is billed
    nowhere: only amounts are compared)."""
    return {key: amount for key, (_, amount) in billed_for(session, january).items() if amount}


@example(
    mode="volume",
    up_to=100,
    prices=(2, 1),
    gpt=None,
    grouped=False,
    on_time=[(10, None)],
    late=[[(89, None)], [(2, None)]],
)
@example(  # a group first seen late, on a finalized invoice that has its price's line at 0
    mode="graduated",
    up_to=100,
    prices=(2, 1),
    gpt=3,
    grouped=True,
    on_time=[],
    late=[[(5, "b"), (4, "a")]],
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(["graduated", "volume"]),
    up_to=st.integers(1, 200),
    prices=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    gpt=st.none() | st.integers(0, 20),
    grouped=st.booleans(),
    on_time=amounts,
    late=st.lists(amounts, min_size=1, max_size=3),
)
def test_january_bills_the_price_of_all_its_usage_once_the_next_invoices_exist(
    session_factory, mode, up_to, prices, gpt, grouped, on_time, late
) -> None:
    with session_factory() as session:
        declare_meter(session, key="tokens", group_by=["model"] if grouped else [])
        chosen = plan(session, mode, up_to, prices, gpt if grouped else None)
        clock = MONTHS[-1]
        bs = BillingService(session=session, tenant_id="t", now=lambda: clock, policy=POLICY)

        def send(uses: list[Use], batch: int) -> None:
            for index, (amount, model) in enumerate(uses):
                bs.record_usage(
                    metric="tokens",
                    amount=amount,
                    at=MONTHS[0] + timedelta(days=index + 1),
                    idempotency_key=f"{batch}-{index}",
                    metadata={"model": model},
                )

        send(on_time, 0)
        january_id = bs.generate_monthly_invoice(
            period_start=MONTHS[0], period_end=MONTHS[1], currency="usd"
        )
        for batch, uses in enumerate(late, start=1):
            send(uses, batch)
            for _ in range(2):  # a retry changes nothing
                bs.generate_monthly_invoice(
                    period_start=MONTHS[batch], period_end=MONTHS[batch + 1], currency="usd"
                )
            every = on_time + [use for uses in late[:batch] for use in uses]
            january = session.get(Invoice, january_id)
            assert amounts_billed(session, january) == recomputed(chosen, every, grouped)
