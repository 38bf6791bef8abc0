"""`GET /quotas`: the caller's standing against each entitlement of its current plan."""

from __future__ import annotations

from fastapi import APIRouter

from billing.api.auth import Reader
from billing.api.deps import ApiDep, SessionDep
from billing.api.problems import problem_responses
from billing.api.schemas import QuotaList, QuotaOut
from billing.quotas import current_quotas

router = APIRouter(tags=["quotas"])


@router.get(
    "/quotas",
    summary="Used, limit, remaining and reset time per entitlement",
    responses=problem_responses(401, 403),
)
def list_quotas(
    principal: Reader,
    session: SessionDep,
    api: ApiDep,
) -> QuotaList:
    """Empty when the tenant has no active subscription: nothing is limited then."""
    statuses = current_quotas(session, tenant_id=principal.tenant_id, now=api.clock())
    return QuotaList(
        items=[
            QuotaOut(
                key=s.key,
                window=s.window,
                limit=s.limit,
                used=s.used,
                remaining=s.remaining,
                reset_at=s.reset_at,
            )
            for s in statuses
        ]
    )
