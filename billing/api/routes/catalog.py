"""Plans, entitlements and prices: read by tenants and operators, changed by operators.

The catalogue is shared by every tenant (it has no tenant column), so only an operator key
(`billing.admin`, no tenant) changes it: one tenant can't re-price another's usage.
"""

from __future__ import annotations

from decimal import Decimal

from fastapi import APIRouter, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from billing.api.auth import CatalogueReader, Operator
from billing.api.deps import ApiDep, SessionDep
from billing.api.problems import invalid_field, problem_responses
from billing.api.schemas import (
    EntitlementOut,
    PlanIn,
    PlanList,
    PlanOut,
    PriceIn,
    PriceOut,
)
from billing.catalog import store_price
from billing.errors import PriceDefinitionError
from billing.models import Plan, PlanEntitlement, Price
from billing.pricing import parse_tiers

router = APIRouter(tags=["plans"])


@router.get(
    "/plans",
    summary="Plans with their entitlements and prices",
    responses=problem_responses(401, 403),
)
def list_plans(
    principal: CatalogueReader,
    session: SessionDep,
) -> PlanList:
    """Every plan, by key."""
    plans = session.execute(
        select(Plan)
        .options(selectinload(Plan.entitlements), selectinload(Plan.prices))
        .order_by(Plan.key)
    ).scalars()
    return PlanList(items=[plan_out(plan) for plan in plans])


@router.post(
    "/plans",
    status_code=201,
    summary="Create or change a plan (operator)",
    responses={
        200: {"model": PlanOut, "description": "Changed"},
        **problem_responses(400, 401, 403, 413, 415, 422),
    },
)
def put_plan(
    body: PlanIn,
    response: Response,
    principal: Operator,
    session: SessionDep,
) -> PlanOut:
    """201 for a new plan key, 200 when the plan existed and was changed."""
    plan = session.execute(select(Plan).where(Plan.key == body.key)).scalar_one_or_none()
    if plan is None:
        plan = Plan(key=body.key, name=body.name, description=body.description)
        session.add(plan)
    else:
        plan.name, plan.description = body.name, body.description
        response.status_code = 200
    session.flush()
    if body.entitlements is not None:
        _replace_entitlements(session, plan, body)
    session.commit()
    session.refresh(plan)
    return plan_out(plan)


@router.post(
    "/prices",
    status_code=201,
    summary="Create or change a price (operator)",
    responses={
        200: {"model": PriceOut, "description": "Changed"},
        **problem_responses(400, 401, 403, 413, 415, 422),
    },
)
def put_price(
    body: PriceIn,
    response: Response,
    principal: Operator,
    session: SessionDep,
    api: ApiDep,
) -> PriceOut:
    """201 for a new price key, 200 when the price existed and was changed. Invoices already
    issued keep their amounts: a price an invoice bills (but a void one) or a live
    subscription holds gets a new version (`billing.catalog.store_price`), the old one kept
    as `KEY@vN`; one nothing uses is changed in place."""
    plan_id = None
    if body.plan_key is not None:
        plan_id = session.execute(select(Plan.id).where(Plan.key == body.plan_key)).scalar()
        if plan_id is None:
            raise invalid_field("plan_key", f"no plan with key {body.plan_key!r}")
    price = Price(
        key=body.key,
        plan_id=plan_id,
        currency=body.currency.lower(),
        metric=body.metric,
        unit_amount=body.unit_amount,
        unit_amount_decimal=(
            Decimal(body.unit_amount_decimal) if body.unit_amount_decimal is not None else None
        ),
        recurring_interval=body.recurring_interval,
        billing_scheme=body.billing_scheme,
        tiers_mode=body.tiers_mode,
        tiers=[tier.model_dump() for tier in body.tiers] if body.tiers else None,
        transform_divide_by=body.transform_divide_by,
        transform_round=body.transform_round,
        dimensions=body.dimensions,
    )
    _check_price(price)
    stored = session.execute(select(Price).where(Price.key == body.key)).scalar_one_or_none()
    if stored is None:
        session.add(price)
    else:
        price = store_price(session, stored, price, now=api.clock())
        response.status_code = 200
    session.commit()
    return price_out(price)


def plan_out(plan: Plan) -> PlanOut:
    """The API form of a plan (entitlements and prices loaded)."""
    return PlanOut(
        id=plan.id,
        key=plan.key,
        name=plan.name,
        description=plan.description,
        created_at=plan.created_at,
        entitlements=[
            EntitlementOut(key=e.key, limit_per_window=e.limit_per_window, window=e.window)
            for e in sorted(plan.entitlements, key=lambda e: (e.key, e.window))
        ],
        prices=[price_out(p) for p in sorted(plan.prices, key=lambda p: p.key)],
    )


def price_out(price: Price) -> PriceOut:
    """The API form of a price; decimal amounts as strings."""
    return PriceOut(
        id=price.id,
        key=price.key,
        currency=price.currency,
        plan_id=price.plan_id,
        metric=price.metric,
        unit_amount=price.unit_amount,
        unit_amount_decimal=(
            None if price.unit_amount_decimal is None else _plain(price.unit_amount_decimal)
        ),
        recurring_interval=price.recurring_interval,
        billing_scheme=price.billing_scheme,
        tiers_mode=price.tiers_mode,
        tiers=price.tiers,
        transform_divide_by=price.transform_divide_by,
        transform_round=price.transform_round,
        created_at=price.created_at,
        dimensions=price.dimensions,
    )


def _replace_entitlements(session: Session, plan: Plan, body: PlanIn) -> None:
    wanted = {(e.key, e.window): e.limit_per_window for e in body.entitlements or []}
    if len(wanted) != len(body.entitlements or []):
        raise invalid_field("entitlements", "each (key, window) may appear once")
    session.execute(delete(PlanEntitlement).where(PlanEntitlement.plan_id == plan.id))
    session.add_all(
        PlanEntitlement(plan_id=plan.id, key=key, window=window, limit_per_window=limit)
        for (key, window), limit in sorted(wanted.items())
    )
    session.flush()


def _check_price(price: Price) -> None:
    if price.billing_scheme == "per_unit":
        if price.unit_amount is None and price.unit_amount_decimal is None:
            raise invalid_field(
                "unit_amount", "a per_unit price needs unit_amount or unit_amount_decimal"
            )
        if price.tiers or price.tiers_mode:
            raise invalid_field("tiers", "tiers belong to tiered prices only")
        return
    if price.metric is None:
        raise invalid_field("metric", "a tiered price bills a metric")
    if price.tiers_mode is None:
        raise invalid_field("tiers_mode", "a tiered price needs tiers_mode graduated or volume")
    try:
        parse_tiers(price.tiers)
    except PriceDefinitionError as error:
        raise invalid_field("tiers", str(error)) from error


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")
