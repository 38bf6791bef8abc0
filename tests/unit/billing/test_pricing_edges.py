"""Pricing at the edges mutation testing found unchecked: a usage that ends exactly on a tier
bound (the next tier's flat fee is not billed), tier lists `parse_tiers` would refuse, and the
exact refusals."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from fractions import Fraction

import pytest

from billing.errors import PriceDefinitionError
from billing.models import Price
from billing.pricing import (
    Tier,
    billable_quantity,
    fixed_amount,
    graduated_cost,
    parse_tiers,
    unit_price,
    usage_amount,
    volume_cost,
)

TIERS = [Tier(10, Fraction(2), 0), Tier(None, Fraction(1), 500)]


@pytest.mark.parametrize(("quantity", "cost"), [(0, 0), (9, 18), (10, 20), (11, 521)])
def test_graduated_bills_a_tiers_flat_fee_only_once_a_unit_falls_inside_it(
    quantity: int, cost: int
) -> None:
    assert graduated_cost(TIERS, quantity) == cost


def test_volume_refuses_tiers_without_an_unbounded_last_tier() -> None:
    with pytest.raises(
        PriceDefinitionError, match=r"^tiers must end with an unbounded tier \(up_to null\)$"
    ):
        volume_cost([Tier(10, Fraction(2), 0)], 11)


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        (None, "a tiered price needs tiers"),
        ([], "a tiered price needs tiers"),
        ([{"up_to": 5}], "only the last tier has up_to null, and it must"),
        ([{"up_to": None}, {"up_to": None}], "only the last tier has up_to null, and it must"),
        ([{"up_to": "10"}, {"up_to": None}], "tier up_to values must be ascending positive ints"),
        ([{"up_to": 10.5}, {"up_to": None}], "tier up_to values must be ascending positive ints"),
        ([{"up_to": True}, {"up_to": None}], "tier up_to values must be ascending positive ints"),
        ([{"up_to": 0}, {"up_to": None}], "tier up_to values must be ascending positive ints"),
        ([{"up_to": None, "flat_amount": -1}], "tier flat_amount must be a non-negative integer"),
    ],
)
def test_malformed_tiers_are_refused_saying_why(tiers: object, message: str) -> None:
    with pytest.raises(PriceDefinitionError) as refused:
        parse_tiers(tiers)  # type: ignore[arg-type]
    assert str(refused.value) == message


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(PriceDefinitionError) as refused:
        call()
    return str(refused.value)


def test_price_refusals_say_exactly_why() -> None:
    no_amount = Price(key="seats", currency="usd", billing_scheme="per_unit")
    assert refusal(lambda: unit_price(no_amount)) == "price 'seats' has no unit amount"
    odd_mode = Price(
        key="calls",
        currency="usd",
        billing_scheme="tiered",
        tiers_mode="stairs",
        tiers=[{"up_to": None, "unit_amount_decimal": "1"}],
    )
    assert refusal(lambda: usage_amount(odd_mode, 3)) == (
        "price 'calls': unknown tiers_mode 'stairs'"
    )
    assert refusal(lambda: billable_quantity(10, -2, None)) == (
        "transform_divide_by must be positive"
    )
    assert refusal(lambda: unit_price(Price(key="f", unit_amount_decimal=0.5))) == (
        "unit amounts must be decimal strings, not floats"
    )
    assert refusal(lambda: unit_price(Price(key="t", unit_amount_decimal="ten"))) == (
        "not a decimal amount: 'ten'"
    )
    assert refusal(lambda: unit_price(Price(key="n", unit_amount_decimal="-1"))) == (
        "unit amounts cannot be negative: '-1'"
    )


def test_a_period_of_zero_length_is_refused() -> None:
    fee = Price(key="fee", currency="usd", unit_amount=100)
    assert refusal(lambda: fixed_amount(fee, timedelta(0), timedelta(0))) == (
        "a billing period must be longer than zero"
    )


def test_a_fixed_fee_is_prorated_to_the_microsecond() -> None:
    # One minor unit per microsecond of a one-day period: the share is exact, nothing rounds.
    fee = Price(key="fee", currency="usd", unit_amount=86_400_000_000)
    half_a_day_and_a_tick = timedelta(hours=12, microseconds=1)
    assert fixed_amount(fee, half_a_day_and_a_tick, timedelta(days=1)) == 43_200_000_001
    assert fixed_amount(fee, timedelta(days=1), timedelta(days=1)) == 86_400_000_000


def test_a_microsecond_is_a_millionth_of_a_second_of_the_period() -> None:
    # One microsecond of a one-second period: exactly a millionth of the fee, nothing to round.
    fee = Price(key="fee", currency="usd", unit_amount=10**12)
    assert fixed_amount(fee, timedelta(microseconds=1), timedelta(seconds=1)) == 10**6


def test_a_tier_without_a_unit_amount_bills_its_flat_amount_only() -> None:
    tiers = parse_tiers([{"up_to": None, "flat_amount": 100}])
    assert tiers == [Tier(None, Fraction(0), 100)]
    assert graduated_cost(tiers, 5) == volume_cost(tiers, 5) == 100
