"""Pricing arithmetic: worked examples and properties (exact, rounded once, half up)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.errors import PriceDefinitionError
from billing.models import Price
from billing.pricing import (
    billable_quantity,
    fixed_amount,
    graduated_cost,
    parse_tiers,
    round_half_up,
    usage_amount,
    volume_cost,
)

TIERS = [
    {"up_to": 1000, "unit_amount_decimal": "0.5", "flat_amount": None},
    {"up_to": 5000, "unit_amount_decimal": "0.4", "flat_amount": 100},
    {"up_to": None, "unit_amount_decimal": "0.25", "flat_amount": 500},
]


def price(**fields) -> Price:
    fields.setdefault("key", "p")
    fields.setdefault("currency", "usd")
    fields.setdefault("billing_scheme", "per_unit")
    return Price(**fields)


@pytest.mark.parametrize(
    ("amount", "rounded"),
    [
        (Fraction(1, 2), 1),
        (Fraction(3, 2), 2),
        (Fraction(49, 100), 0),
        (Fraction(251, 100), 3),
        (Fraction(0), 0),
        (Fraction(-1, 2), -1),
    ],
)
def test_round_half_up(amount, rounded) -> None:
    assert round_half_up(amount) == rounded


def test_per_unit_with_a_sub_cent_price_rounds_once_per_line() -> None:
    # 12,345 tokens at 0.0002 cents = 2.469 cents -> 2; per-event rounding would give 0.
    p = price(metric="tokens", unit_amount_decimal=Decimal("0.0002"))
    assert usage_amount(p, 12_345) == 2
    assert usage_amount(p, 12_500) == 3  # 2.5 rounds half up


def test_unit_amount_decimal_wins_over_unit_amount() -> None:
    p = price(metric="gb", unit_amount=100, unit_amount_decimal=Decimal("2.5"))
    assert usage_amount(p, 3) == 8  # 7.5 -> 8


def test_graduated_worked_example() -> None:
    p = price(metric="calls", billing_scheme="tiered", tiers_mode="graduated", tiers=TIERS)
    # 1000 × 0.5 + (4000 × 0.4 + 100) + (1000 × 0.25 + 500) = 500 + 1700 + 750
    assert usage_amount(p, 6000) == 2950
    assert usage_amount(p, 1000) == 500  # the second tier's flat fee is not due yet
    assert usage_amount(p, 1001) == 600  # one unit into tier two: 500 + 0.4 + 100 = 600.4
    assert usage_amount(p, 1002) == 601  # 600.8
    assert usage_amount(p, 0) == 0


def test_volume_worked_example() -> None:
    p = price(metric="calls", billing_scheme="tiered", tiers_mode="volume", tiers=TIERS)
    assert usage_amount(p, 6000) == 6000 // 4 + 500  # all at 0.25, plus 500
    assert usage_amount(p, 5000) == 2000 + 100
    assert usage_amount(p, 1) == 1  # 0.5 rounds up
    assert usage_amount(p, 0) == 0  # q' = 0 bills 0, not the first tier's flat fee


def test_package_pricing_rounds_up_or_down() -> None:
    up = price(metric="gb", unit_amount=500, transform_divide_by=10, transform_round="up")
    down = price(metric="gb", unit_amount=500, transform_divide_by=10, transform_round="down")
    assert usage_amount(up, 21) == 1500
    assert usage_amount(down, 21) == 1000
    assert usage_amount(up, 20) == usage_amount(down, 20) == 1000
    assert usage_amount(up, 0) == 0


def test_fixed_price_is_prorated_by_seconds() -> None:
    p = price(unit_amount=3100, recurring_interval="month")
    month = timedelta(days=31)
    assert fixed_amount(p, month, month) == 3100
    assert fixed_amount(p, timedelta(days=10), month) == 1000
    assert fixed_amount(p, timedelta(days=15, hours=12), month) == 1550
    assert fixed_amount(p, timedelta(0), month) == 0


@pytest.mark.parametrize(
    "tiers",
    [
        [],
        [{"up_to": 10, "unit_amount_decimal": "1"}],  # last tier bounded
        [{"up_to": None, "unit_amount_decimal": "1"}, {"up_to": None}],
        [{"up_to": 10}, {"up_to": 5}, {"up_to": None}],  # not ascending
        [{"up_to": None, "unit_amount_decimal": "-1"}],
        [{"up_to": None, "unit_amount_decimal": "abc"}],
        [{"up_to": None, "flat_amount": 1.5}],
    ],
)
def test_malformed_tiers_are_refused(tiers) -> None:
    with pytest.raises(PriceDefinitionError):
        parse_tiers(tiers)


def test_equal_tier_bounds_are_refused() -> None:
    with pytest.raises(PriceDefinitionError, match="ascending"):
        parse_tiers([{"up_to": 10}, {"up_to": 10}, {"up_to": None}])
    assert [t.up_to for t in parse_tiers([{"up_to": 10}, {"up_to": 11}, {"up_to": None}])] == [
        10,
        11,
        None,
    ]


def test_a_negative_flat_amount_is_refused_and_zero_is_accepted() -> None:
    with pytest.raises(PriceDefinitionError, match="flat_amount"):
        parse_tiers([{"up_to": None, "unit_amount_decimal": "1", "flat_amount": -1}])
    [tier] = parse_tiers([{"up_to": None, "unit_amount_decimal": "1", "flat_amount": 0}])
    assert tier.flat_amount == 0


def test_volume_pricing_bills_zero_units_zero_even_when_the_first_tier_has_a_flat_fee() -> None:
    tiers = [
        {"up_to": 10, "unit_amount_decimal": "1", "flat_amount": 700},
        {"up_to": None, "unit_amount_decimal": "0.5", "flat_amount": 900},
    ]
    p = price(metric="calls", billing_scheme="tiered", tiers_mode="volume", tiers=tiers)
    assert usage_amount(p, 0) == 0
    assert volume_cost(parse_tiers(tiers), 0) == 0
    assert usage_amount(p, 1) == 701


def test_package_rounding_defaults_to_up_when_transform_round_is_unset() -> None:
    p = price(metric="gb", unit_amount=500, transform_divide_by=10)
    assert p.transform_round is None
    assert usage_amount(p, 21) == 1500  # ⌈21 / 10⌉ = 3 packages
    assert usage_amount(p, 1) == 500
    assert billable_quantity(21, 10, None) == 3


def test_a_price_without_any_unit_amount_is_refused() -> None:
    with pytest.raises(PriceDefinitionError):
        usage_amount(price(metric="x"), 1)


# --- properties ----------------------------------------------------------------------------

amounts = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False)


@st.composite
def tier_lists(draw):
    bounds = sorted(set(draw(st.lists(st.integers(1, 500), max_size=4))))
    tiers = [
        {
            "up_to": b,
            "unit_amount_decimal": str(draw(amounts)),
            "flat_amount": draw(st.none() | st.integers(0, 1000)),
        }
        for b in bounds
    ]
    tiers.append(
        {
            "up_to": None,
            "unit_amount_decimal": str(draw(amounts)),
            "flat_amount": draw(st.none() | st.integers(0, 1000)),
        }
    )
    return tiers


def unit_by_unit(tiers, quantity):
    """The graduated definition spelled out: each unit at its tier's price, flats once."""
    parsed = parse_tiers(tiers)
    cost = Fraction(0)
    touched = set()
    for unit in range(1, quantity + 1):
        index = next(i for i, t in enumerate(parsed) if t.up_to is None or unit <= t.up_to)
        cost += parsed[index].unit_amount
        touched.add(index)
    return cost + sum(parsed[i].flat_amount for i in touched)


@given(tier_lists(), st.integers(0, 800))
def test_graduated_equals_pricing_each_unit_in_its_tier(tiers, quantity) -> None:
    assert graduated_cost(parse_tiers(tiers), quantity) == unit_by_unit(tiers, quantity)


@given(tier_lists(), st.integers(0, 10_000))
def test_graduated_cost_never_falls_as_usage_grows(tiers, quantity) -> None:
    parsed = parse_tiers(tiers)
    assert graduated_cost(parsed, quantity + 1) >= graduated_cost(parsed, quantity)


@given(tier_lists(), st.integers(1, 10_000))
def test_volume_bills_every_unit_at_one_tier_price(tiers, quantity) -> None:
    parsed = parse_tiers(tiers)
    tier = next(t for t in parsed if t.up_to is None or quantity <= t.up_to)
    assert volume_cost(parsed, quantity) == quantity * tier.unit_amount + tier.flat_amount


@given(tier_lists())
def test_a_single_tier_graduated_or_volume_price_is_per_unit(tiers) -> None:
    last = tiers[-1]
    single = [{"up_to": None, "unit_amount_decimal": last["unit_amount_decimal"]}]
    per_unit = price(metric="m", unit_amount_decimal=Decimal(last["unit_amount_decimal"]))
    for mode in ("graduated", "volume"):
        tiered = price(metric="m", billing_scheme="tiered", tiers_mode=mode, tiers=single)
        for q in (0, 1, 7, 1234):
            assert usage_amount(tiered, q) == usage_amount(per_unit, q)


@given(st.integers(0, 10**9), st.integers(1, 10**6))
def test_package_rounding_brackets_the_exact_quotient(quantity, size) -> None:
    up = billable_quantity(quantity, size, "up")
    down = billable_quantity(quantity, size, "down")
    assert down * size <= quantity <= up * size
    assert up - down in (0, 1)
    assert (up == down) == (quantity % size == 0)


@given(amounts, st.integers(0, 10**7))
def test_a_line_is_the_exact_amount_rounded_half_up_once(unit, quantity) -> None:
    p = price(metric="m", unit_amount_decimal=unit)
    exact = Fraction(unit) * quantity
    assert abs(usage_amount(p, quantity) - exact) <= Fraction(1, 2)
    assert usage_amount(p, quantity) == int((Decimal(unit) * quantity + Decimal("0.5")) // 1)


@given(st.integers(0, 10**8), st.integers(1, 31 * 86400), st.data())
def test_prorated_shares_of_a_period_add_up_to_the_price_within_rounding(unit, seconds, data):
    cut = data.draw(st.integers(0, seconds))
    p = price(unit_amount=unit, recurring_interval="month")
    period = timedelta(seconds=seconds)
    parts = fixed_amount(p, timedelta(seconds=cut), period) + fixed_amount(
        p, timedelta(seconds=seconds - cut), period
    )
    assert abs(parts - unit) <= 1
    assert fixed_amount(p, period, period) == unit
