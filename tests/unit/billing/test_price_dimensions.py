"""Prices per dimension: each group of a metric is its own invoice line, billed by the most
specific matching price, else the metric's price without dimensions, else shown at 0; on
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select

from billing import BillingService, PriceDefinitionError
from billing.dimensions import describe
from billing.meters import GROUP_VALUE_LENGTH, declare_meter
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from billing.providers.stripe import _describe as stripe_description

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MID = datetime(2025, 1, 16, tzinfo=UTC)
LONG = "m" * GROUP_VALUE_LENGTH  # a model name as long as a group value is kept


def plan_with(session, key: str, *prices: dict) -> Plan:
    plan = Plan(key=key, name=key)
    session.add(plan)
    session.flush()
    for index, fields in enumerate(prices):
        session.add(Price(key=f"{key}-{index}", plan_id=plan.id, currency="usd", **fields))
    session.flush()
    return plan


def subscribe(session, plan: Plan, start=JAN - timedelta(days=3), end=None, tenant="t") -> None:
    session.add(Subscription(tenant_id=tenant, plan_id=plan.id, effective_at=start, ended_at=end))
    session.flush()


def use(session, amount: int, at: datetime, tenant="t", metric="tokens", **metadata) -> None:
    BillingService(session=session, tenant_id=tenant).record_usage(
        metric=metric,
        amount=amount,
        at=at,
        idempotency_key=f"{metric}-{amount}-{at.isoformat()}-{sorted(metadata.items())}",
        metadata=metadata or None,
    )


def invoice_lines(session, tenant="t") -> list[tuple]:
    """(price key or None, group as a sorted tuple, quantity, amount), sorted."""
    bs = BillingService(session=session, tenant_id=tenant)
    invoice_id = bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    invoice = session.get(Invoice, invoice_id)
    lines = session.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id))
    rows = [
        (
            session.get(Price, line.price_id).key if line.price_id else None,
            tuple(sorted((line.dimensions or {}).items())),
            line.quantity,
            line.amount,
        )
        for line in lines
    ]
    assert invoice.total_amount == sum(row[3] for row in rows)
    return sorted(rows, key=repr)


def test_gpt4_at_its_price_everything_else_at_the_default_each_group_a_line(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(
        session,
        "ai",
        {"metric": "tokens", "unit_amount": 3, "dimensions": {"model": "gpt-4"}},
        {"metric": "tokens", "unit_amount": 1},
    )
    subscribe(session, plan)
    use(session, 100, JAN + timedelta(days=1), model="gpt-4")
    use(session, 50, JAN + timedelta(days=2), model="gpt-4")
    use(session, 70, JAN + timedelta(days=3), model="claude")
    use(session, 9, JAN + timedelta(days=4))  # no model: "everything else" too
    use(session, 1000, FEB, model="gpt-4")  # next period
    use(session, 5, JAN, tenant="other", model="gpt-4")  # another tenant
    assert invoice_lines(session) == [
        ("ai-0", (("model", "gpt-4"),), 150, 450),
        ("ai-1", (("model", "claude"),), 70, 70),
        ("ai-1", (("model", None),), 9, 9),
    ]


def test_the_most_specific_price_wins_and_unpriced_groups_show_at_zero(session) -> None:
    declare_meter(session, key="tokens", group_by=["model", "region"])
    plan = plan_with(
        session,
        "ai",
        {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "gpt-4"}},
        {"metric": "tokens", "unit_amount": 5, "dimensions": {"model": "gpt-4", "region": "eu"}},
    )
    subscribe(session, plan)
    use(session, 10, JAN, model="gpt-4", region="eu")
    use(session, 20, JAN, model="gpt-4", region="us")
    use(session, 30, JAN, model="claude", region="eu")
    use(session, 0, JAN, model="llama", region="eu")  # a group of quantity 0: not shown
    assert invoice_lines(session) == [
        ("ai-0", (("model", "gpt-4"), ("region", "us")), 20, 40),
        ("ai-1", (("model", "gpt-4"), ("region", "eu")), 10, 50),
        (None, (("model", "claude"), ("region", "eu")), 30, 0),
    ]


def test_a_price_that_bills_no_group_still_has_a_line_at_zero(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(
        session, "ai", {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "o1"}}
    )
    subscribe(session, plan)
    assert invoice_lines(session) == [("ai-0", (("model", "o1"),), 0, 0)]


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # 150 units per group: the first 100 free in each group, not once for the metric
        (
            {
                "billing_scheme": "tiered",
                "tiers_mode": "graduated",
                "tiers": [
                    {"up_to": 100, "unit_amount_decimal": "0", "flat_amount": None},
                    {"up_to": None, "unit_amount_decimal": "2", "flat_amount": 7},
                ],
            },
            (107, 107),
        ),
        # volume: each group's 150 falls in the second tier on its own
        (
            {
                "billing_scheme": "tiered",
                "tiers_mode": "volume",
                "tiers": [
                    {"up_to": 100, "unit_amount_decimal": "3", "flat_amount": None},
                    {"up_to": None, "unit_amount_decimal": "1", "flat_amount": None},
                ],
            },
            (150, 150),
        ),
        # packages of 100, rounded up per group: 2 each
        ({"unit_amount": 10, "transform_divide_by": 100, "transform_round": "up"}, (20, 20)),
        ({"unit_amount_decimal": "0.5"}, (75, 75)),
    ],
)
def test_every_scheme_applies_per_group(session, scheme, expected) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(session, "ai", {"metric": "tokens", **scheme})
    subscribe(session, plan)
    use(session, 150, JAN, model="a")
    use(session, 150, JAN, model="b")
    lines = invoice_lines(session)
    assert [(line[1], line[2]) for line in lines] == [
        ((("model", "a"),), 150),
        ((("model", "b"),), 150),
    ]
    assert tuple(line[3] for line in lines) == expected


@pytest.mark.parametrize(
    ("aggregation", "prop", "gpt4", "claude"),
    [
        ("sum", None, 12, 40),
        ("count", None, 2, 2),
        ("max", None, 9, 30),
        ("unique_count", "user", 1, 2),
        ("latest", None, 3, 10),
    ],
)
def test_each_aggregation_is_billed_per_group(session, aggregation, prop, gpt4, claude) -> None:
    declare_meter(session, key="tokens", aggregation=aggregation, property=prop, group_by=["model"])
    plan = plan_with(
        session,
        "ai",
        {"metric": "tokens", "unit_amount": 100, "dimensions": {"model": "gpt-4"}},
        {"metric": "tokens", "unit_amount": 1},
    )
    subscribe(session, plan)
    use(session, 9, JAN + timedelta(days=1), model="gpt-4", user="u1")
    use(session, 3, JAN + timedelta(days=9), model="gpt-4", user="u1")
    use(session, 30, JAN + timedelta(days=2), model="claude", user="u1")
    use(session, 10, JAN + timedelta(days=5), model="claude", user="u2")
    assert invoice_lines(session) == [
        ("ai-0", (("model", "gpt-4"),), gpt4, gpt4 * 100),
        ("ai-1", (("model", "claude"),), claude, claude),
    ]


def test_a_metric_billed_whole_keeps_one_line_without_dimensions(session) -> None:
    plan = plan_with(session, "ai", {"metric": "tokens", "unit_amount": 2})
    subscribe(session, plan)
    use(session, 10, JAN, model="gpt-4")
    use(session, 5, JAN, model="claude")
    assert invoice_lines(session) == [("ai-0", (), 15, 30)]
    (line,) = session.scalars(select(InvoiceLine)).all()
    assert line.dimensions is None


# --- a plan switch mid-period -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "before", "after"),
    [
        ("max", 40, 25),  # each subscription its own stretch's peak: not 40 twice, not 65
        ("latest", 15, 25),  # the value at each stretch's last event
        ("sum", 55, 25),
    ],
)
def test_a_plan_switch_bills_each_subscription_for_its_own_stretch(
    session, aggregation, before, after
) -> None:
    declare_meter(session, key="seats", aggregation=aggregation)
    basic = plan_with(session, "basic", {"metric": "seats", "unit_amount": 1})
    pro = plan_with(session, "pro", {"metric": "seats", "unit_amount": 100})
    subscribe(session, basic, end=MID)
    subscribe(session, pro, start=MID)
    use(session, 40, MID - timedelta(days=5), metric="seats")
    use(session, 15, MID - timedelta(microseconds=1), metric="seats")  # last before the switch
    use(session, 25, MID, metric="seats")  # at the switch instant: the new plan's
    assert invoice_lines(session) == [
        ("basic-0", (), before, before),
        ("pro-0", (), after, after * 100),
    ]


@pytest.mark.parametrize(
    ("aggregation", "prop", "expected", "reads"),
    [
        ("unique_count", "user", 2, 3),  # u1 in three stretches, counted once: counted again
        ("max", None, 8, 2),
        ("latest", None, 4, 3),  # the last stretch's; its own window query
        ("count", None, 4, 2),
        ("sum", None, 20, 2),
    ],
)
def test_unpriced_usage_over_several_stretches_is_aggregated_once(
    session, engine, aggregation, prop, expected, reads
) -> None:
    declare_meter(session, key="tokens", aggregation=aggregation, property=prop)
    other = plan_with(session, "other", {"metric": "calls", "unit_amount": 1})
    # Subscribed for [MID - 5 days, MID) and from MID + 5 days: four stretches, the gaps
    # between; tokens unpriced in all four
    subscribe(session, other, start=MID - timedelta(days=5), end=MID)
    subscribe(session, other, start=MID + timedelta(days=5))
    use(session, 8, JAN + timedelta(days=2), user="u1")
    use(session, 5, MID - timedelta(days=2), user="u1")
    use(session, 3, MID + timedelta(days=2), user="u1")
    use(session, 4, MID + timedelta(days=7), user="u2")
    ledger_reads = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if "usage_events" in statement:
            ledger_reads.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert (None, (), expected, 0) in invoice_lines(session)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    # The metrics used, their quantities per stretch; only a unique count is read again.
    assert len(ledger_reads) == reads


def test_unpriced_unique_counts_over_several_stretches_are_counted_again_per_group(
    session,
) -> None:
    declare_meter(
        session, key="tokens", aggregation="unique_count", property="user", group_by=["model"]
    )
    other = plan_with(session, "other", {"metric": "calls", "unit_amount": 1})
    subscribe(session, other, start=MID)  # stretches [JAN, MID) and [MID, FEB), tokens unpriced
    for at, model, user in [
        (JAN, "claude", "u6"),  # at the period's start: counted
        (JAN + timedelta(days=2), "gpt-4", "u1"),
        (MID + timedelta(days=1), "gpt-4", "u1"),  # in both stretches: counted once
        (MID + timedelta(days=2), "gpt-4", "u2"),
        (JAN + timedelta(days=3), "claude", "u3"),
        (MID + timedelta(days=3), "claude", "u4"),
        (JAN + timedelta(days=4), None, "u1"),
        (MID + timedelta(days=4), None, "u5"),
        (JAN - timedelta(microseconds=1), "gpt-4", "u7"),  # before the period
        (FEB, "gpt-4", "u8"),  # at its end: the next period's
        (MID + timedelta(days=5), "o1", "u1"),  # one stretch, one user
        (JAN + timedelta(days=6), LONG, "u1"),  # grouped by its first characters
        (MID + timedelta(days=6), LONG + "-v2", "u2"),
    ]:
        use(session, 1, at, user=user, **({"model": model} if model else {}))
    use(session, 1, MID, tenant="other", model="gpt-4", user="u9")
    use(session, 1, MID, metric="calls", model="gpt-4", user="u10")
    assert invoice_lines(session) == [
        ("other-0", (), 1, 1),
        (None, (("model", "claude"),), 3, 0),
        (None, (("model", "gpt-4"),), 2, 0),
        (None, (("model", LONG),), 2, 0),
        (None, (("model", "o1"),), 1, 0),
        (None, (("model", None),), 2, 0),
    ]


def test_booleans_and_numbers_match_prices_by_postgresql_s_text_of_them(session) -> None:
    declare_meter(session, key="tokens", group_by=["tier"])
    plan = plan_with(
        session,
        "ai",
        {"metric": "tokens", "unit_amount": 100, "dimensions": {"tier": "true"}},
        {"metric": "tokens", "unit_amount": 10, "dimensions": {"tier": "false"}},
        {"metric": "tokens", "unit_amount": 5, "dimensions": {"tier": "1.0"}},
        {"metric": "tokens", "unit_amount": 1},
    )
    subscribe(session, plan)
    for amount, tier in [(1, True), (2, "true"), (4, False), (8, 1.0), (16, 1), (32, "x")]:
        use(session, amount, JAN + timedelta(days=1), tier=tier)
    assert invoice_lines(session) == [
        ("ai-0", (("tier", "true"),), 3, 300),
        ("ai-1", (("tier", "false"),), 4, 40),
        ("ai-2", (("tier", "1.0"),), 8, 40),
        ("ai-3", (("tier", "1"),), 16, 16),
        ("ai-3", (("tier", "x"),), 32, 32),
    ]


def test_a_boolean_group_s_unique_count_over_several_stretches_is_its_own(session) -> None:
    declare_meter(
        session, key="tokens", aggregation="unique_count", property="user", group_by=["tier"]
    )
    other = plan_with(session, "other", {"metric": "calls", "unit_amount": 1})
    subscribe(session, other, start=MID)  # stretches [JAN, MID) and [MID, FEB), tokens unpriced
    for at, tier, user in [
        (JAN + timedelta(days=1), True, "u1"),
        (MID + timedelta(days=1), True, "u1"),
        (MID + timedelta(days=2), "true", "u2"),
        (JAN + timedelta(days=2), 1, "u3"),
        (MID + timedelta(days=3), False, "u4"),
    ]:
        use(session, 1, at, user=user, tier=tier)
    assert invoice_lines(session) == [
        ("other-0", (), 0, 0),
        (None, (("tier", "1"),), 1, 0),
        (None, (("tier", "false"),), 1, 0),
        (None, (("tier", "true"),), 2, 0),
    ]


def test_the_lines_come_by_group_value_a_missing_one_first_then_the_unpriced_by_metric(
    session,
) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    declare_meter(session, key="calls", group_by=["region"])
    plan = plan_with(session, "ai", {"metric": "tokens", "unit_amount": 1})
    subscribe(session, plan, start=MID)  # [JAN, MID): no subscription, its usage unpriced
    for amount, model in [(1, "b"), (2, None), (3, "a"), (10, "B"), (12, "")]:
        kept = {"model": model} if model is not None else {}
        use(session, amount, MID + timedelta(days=1), **kept)
    for amount, at, region in [
        (4, JAN, "z"),
        (5, JAN, "m"),
        (6, MID, "m"),
        (7, MID, None),
        (8, MID, "a"),
    ]:
        use(session, amount, at, metric="calls", **({"region": region} if region else {}))
    use(session, 9, MID, metric="visits")  # no group: before any group of its metric
    bs = BillingService(session=session, tenant_id="t")
    preview = bs.preview_invoice(period_start=JAN, period_end=FEB, currency="usd")
    assert [(line.metric, line.dimensions, line.quantity) for line in preview.lines] == [
        ("tokens", {"model": None}, 2),
        ("tokens", {"model": ""}, 12),  # an empty value is a value, before any other
        ("tokens", {"model": "B"}, 10),
        ("tokens", {"model": "a"}, 3),
        ("tokens", {"model": "b"}, 1),
        ("calls", {"region": None}, 7),
        ("calls", {"region": "a"}, 8),
        ("calls", {"region": "m"}, 11),
        ("calls", {"region": "z"}, 4),
        ("visits", None, 9),
    ]


# --- rules ------------------------------------------------------------------------------------


def test_equally_specific_prices_that_can_match_one_group_are_refused(session) -> None:
    declare_meter(session, key="tokens", group_by=["model", "region"])
    plan = plan_with(
        session, "ai", {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "gpt-4"}}
    )
    session.add(
        Price(
            key="eu",
            plan_id=plan.id,
            currency="usd",
            metric="tokens",
            unit_amount=3,
            dimensions={"region": "eu"},
        )
    )
    with pytest.raises(PriceDefinitionError, match="'ai-0' names as many") as raised:
        session.flush()
    assert raised.value.field == "dimensions"
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Price)) == 0


def test_the_same_dimensions_twice_in_one_flush_are_refused(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    with pytest.raises(PriceDefinitionError, match="names as many"):
        plan_with(
            session,
            "ai",
            {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "gpt-4"}},
            {"metric": "tokens", "unit_amount": 3, "dimensions": {"model": "gpt-4"}},
        )


def test_prices_that_never_share_a_group_or_differ_elsewhere_are_accepted(session) -> None:
    declare_meter(session, key="tokens", group_by=["model", "region"])
    one = plan_with(
        session,
        "ai",
        {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "gpt-4"}},
        {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "claude"}},
        {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "gpt-4", "region": "eu"}},
        {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "o1", "region": "eu"}},
    )
    session.add_all(  # the same dimensions in another currency and in another plan
        [
            Price(
                key="eur",
                plan_id=one.id,
                currency="eur",
                metric="tokens",
                unit_amount=2,
                dimensions={"model": "gpt-4"},
            ),
            Price(
                key="other",
                plan_id=plan_with(session, "b").id,
                currency="usd",
                metric="tokens",
                unit_amount=2,
                dimensions={"model": "gpt-4"},
            ),
        ]
    )
    session.flush()
    assert session.scalar(select(func.count()).select_from(Price)) == 6


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"metric": "tokens", "dimensions": {"region": "eu"}}, "not in the group_by"),
        (
            {"metric": None, "recurring_interval": "month", "dimensions": {"model": "a"}},
            "only a usage price",
        ),
        ({"metric": "tokens", "dimensions": {}}, "1 to 5 properties"),
        ({"metric": "tokens", "dimensions": {"model": 4}}, "strings of 1 to 100"),
        ({"metric": "tokens", "dimensions": {"model": "x" * 101}}, "strings of 1 to 100"),
        ({"metric": "tokens", "dimensions": {"model": ""}}, "strings of 1 to 100"),
        ({"metric": "tokens", "dimensions": {"bad key": "a"}}, "metadata keys"),
        ({"metric": "tokens", "dimensions": ["model"]}, "an object"),
    ],
)
def test_malformed_dimensions_are_refused_and_nothing_is_stored(session, fields, message) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    session.add(Price(key="p", currency="usd", unit_amount=1, **fields))
    with pytest.raises(PriceDefinitionError, match=message):
        session.flush()
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Price)) == 0


def test_a_value_of_exactly_100_characters_is_accepted_and_matches(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    long = "m" * 100
    plan = plan_with(
        session, "ai", {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": long}}
    )
    subscribe(session, plan)
    use(session, 4, JAN, model=long + "-and-more")  # groups compare their first 100 characters
    assert invoice_lines(session) == [("ai-0", (("model", long),), 4, 8)]


def test_a_meter_that_dropped_a_priced_property_still_bills_by_it(session) -> None:
    declare_meter(session, key="tokens", group_by=["model"])
    plan = plan_with(
        session, "ai", {"metric": "tokens", "unit_amount": 2, "dimensions": {"model": "gpt-4"}}
    )
    subscribe(session, plan)
    declare_meter(session, key="tokens")  # later redeclared without group_by
    use(session, 4, JAN, model="gpt-4")
    use(session, 6, JAN, model="claude")
    assert invoice_lines(session) == [
        ("ai-0", (("model", "gpt-4"),), 4, 8),
        (None, (("model", "claude"),), 6, 0),
    ]


def test_lines_are_named_with_their_group() -> None:
    assert (
        describe("tokens", {"model": "gpt-4", "region": None}) == "tokens (model=gpt-4, region=-)"
    )
    assert describe("tokens", None) == "tokens"
    assert describe(None, None) == "fixed fee"


def test_a_provider_s_line_description_names_the_group() -> None:
    line = InvoiceLine(metric="tokens", quantity=1000, amount=0, dimensions={"model": "gpt-4"})
    assert stripe_description(line) == "tokens (model=gpt-4): 1,000 units"
    whole = InvoiceLine(metric="tokens", quantity=5, amount=0)
    assert stripe_description(whole) == "tokens: 5 units"
