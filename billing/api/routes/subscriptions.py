"""Subscriptions: a tenant lists its own (`billing.read`); an operator (`billing.admin`) lists,
creates and cancels any tenant's, the tenant named in the path or the body. A tenant cannot
end its own subscription: that would lift its quotas.

Creating one the tenant already has (the same plan active at `effective_at`: a request sent
twice without an `Idempotency-Key`) or one overlapping another is a 409
`urn:billing:problem:subscription-conflict` naming the existing subscription (`existing_id`);
nothing changes. On PostgreSQL the tenant's subscriptions lock is held from the check to the
commit, so two such requests at once store one subscription."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Path
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from billing.api.auth import Operator, Reader
from billing.api.deps import ApiDep, SessionDep
from billing.api.problems import ProblemError, invalid_field, problem_responses
from billing.api.schemas import (
    CancelIn,
    ResourceId,
    SubscriptionIn,
    SubscriptionList,
    SubscriptionOut,
    TenantId,
)
from billing.catalog_rules import lock_tenant_subscriptions
from billing.errors import SubscriptionConflictError
from billing.models import Plan, Subscription

router = APIRouter(tags=["subscriptions"])


@router.get(
    "/subscriptions",
    summary="The caller's subscriptions",
    responses=problem_responses(401, 403),
)
def list_subscriptions(
    principal: Reader,
    session: SessionDep,
) -> SubscriptionList:
    """The tenant's subscriptions, oldest first."""
    return _subscriptions_of(session, principal.tenant_id)


@router.get(
    "/tenants/{tenant_id}/subscriptions",
    summary="A tenant's subscriptions (operator)",
    responses=problem_responses(401, 403, 422),
)
def list_tenant_subscriptions(
    tenant_id: Annotated[TenantId, Path()],
    principal: Operator,
    session: SessionDep,
) -> SubscriptionList:
    """The tenant's subscriptions, oldest first (none for a tenant never subscribed)."""
    return _subscriptions_of(session, tenant_id)


@router.post(
    "/subscriptions",
    status_code=201,
    summary="Subscribe a tenant to a plan (operator)",
    responses=problem_responses(400, 401, 403, 409, 413, 415, 422),
)
def create_subscription(
    body: SubscriptionIn,
    principal: Operator,
    session: SessionDep,
    api: ApiDep,
) -> SubscriptionOut:
    """The new subscription. Subscriptions of the tenant still open at `effective_at` end then,
    so changing plans is one call. The plan the tenant is already on then is a 409 naming
    that subscription, as is an overlap with a later one."""
    plan = session.execute(select(Plan).where(Plan.key == body.plan_key)).scalar_one_or_none()
    if plan is None:
        raise invalid_field("plan_key", f"no plan with key {body.plan_key!r}")
    effective_at = body.effective_at or api.clock()
    if body.ended_at is not None and body.ended_at <= effective_at:
        raise invalid_field("ended_at", "must be after effective_at")
    lock_tenant_subscriptions(session, body.tenant_id)
    _refuse_repeat(session, body.tenant_id, plan, effective_at)
    session.execute(
        update(Subscription)
        .where(
            Subscription.tenant_id == body.tenant_id,
            Subscription.effective_at < effective_at,
            (Subscription.ended_at.is_(None)) | (Subscription.ended_at > effective_at),
        )
        .values(ended_at=effective_at)
    )
    subscription = Subscription(
        tenant_id=body.tenant_id,
        plan_id=plan.id,
        effective_at=effective_at,
        ended_at=body.ended_at,
    )
    session.add(subscription)
    session.commit()
    return subscription_out(subscription, plan.key)


@router.post(
    "/subscriptions/{subscription_id}/cancel",
    summary="End a tenant's subscription (operator)",
    responses=problem_responses(400, 401, 403, 404, 413, 415, 422),
)
def cancel_subscription(
    principal: Operator,
    session: SessionDep,
    api: ApiDep,
    subscription_id: Annotated[str, Path(max_length=36, pattern=ResourceId)],
    body: Annotated[CancelIn | None, Body()] = None,
) -> SubscriptionOut:
    """Ends it at `at` (default now). Cancelling again, or with a later time, changes
    nothing: a subscription only ever ends earlier."""
    row = session.execute(
        select(Subscription, Plan.key)
        .join(Plan, Plan.id == Subscription.plan_id)
        .where(Subscription.id == subscription_id)
    ).one_or_none()
    if row is None:
        raise ProblemError(404, "Not found", "no such subscription", slug="not-found")
    subscription, plan_key = row
    at = (body.at if body else None) or api.clock()
    if at < subscription.effective_at:
        raise invalid_field("at", "a subscription cannot end before it starts")
    if subscription.ended_at is None or at < subscription.ended_at:
        subscription.ended_at = at
    session.commit()
    return subscription_out(subscription, plan_key)


def _refuse_repeat(session: Session, tenant_id: str, plan: Plan, at: datetime) -> None:
    """Raise `SubscriptionConflictError` if the tenant is on `plan` at `at` already."""
    existing = session.execute(
        select(Subscription.id, Subscription.effective_at).where(
            Subscription.tenant_id == tenant_id,
            Subscription.plan_id == plan.id,
            Subscription.effective_at <= at,
            (Subscription.ended_at.is_(None)) | (Subscription.ended_at > at),
        )
    ).first()
    if existing is not None:
        raise SubscriptionConflictError(
            f"tenant {tenant_id!r} is on plan {plan.key!r} at {at.isoformat()} already: "
            f"subscription {existing.id} from {existing.effective_at.isoformat()}",
            existing_id=existing.id,
        )


def _subscriptions_of(session: Session, tenant_id: str) -> SubscriptionList:
    rows = session.execute(
        select(Subscription, Plan.key)
        .join(Plan, Plan.id == Subscription.plan_id)
        .where(Subscription.tenant_id == tenant_id)
        .order_by(Subscription.effective_at, Subscription.id)
    ).all()
    return SubscriptionList(items=[subscription_out(sub, key) for sub, key in rows])


def subscription_out(subscription: Subscription, plan_key: str) -> SubscriptionOut:
    """The API form of a subscription."""
    return SubscriptionOut(
        id=subscription.id,
        tenant_id=subscription.tenant_id,
        plan_id=subscription.plan_id,
        plan_key=plan_key,
        effective_at=subscription.effective_at,
        ended_at=subscription.ended_at,
        created_at=subscription.created_at,
    )
