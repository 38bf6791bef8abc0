"""Pricing at the edges mutation testing found unchecked: a usage that ends exactly on a tier
bound (the next tier's flat fee is not billed), tier lists `parse_tiers` would refuse, and the
exact refusals."""

from __future__ import annotations

from fractions import Fraction

import pytest

from billing.errors import PriceDefinitionError
from billing.pricing import Tier, graduated_cost, parse_tiers, volume_cost

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
    ],
)
def test_malformed_tiers_are_refused_saying_why(tiers: object, message: str) -> None:
    with pytest.raises(PriceDefinitionError) as refused:
        parse_tiers(tiers)  # type: ignore[arg-type]
    assert str(refused.value) == message
