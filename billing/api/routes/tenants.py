"""Tenants' settings (name, time zone): read and set by operators (`billing.admin`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from billing.api.auth import Operator
from billing.api.deps import SessionDep
from billing.api.problems import problem_responses
from billing.api.schemas import TenantId, TenantIn, TenantList, TenantOut
from billing.models import Tenant
from billing.tenants import TenantInfo, get_tenant, list_tenants, set_tenant

router = APIRouter(tags=["tenants"])


@router.get(
    "/tenants",
    summary="Tenants that have settings (operator)",
    responses=problem_responses(401, 403),
)
def get_tenants(principal: Operator, session: SessionDep) -> TenantList:
    """Every tenant with a row, by id; a tenant not listed is billed in UTC."""
    return TenantList(items=[tenant_out(info) for info in list_tenants(session)])


@router.get(
    "/tenants/{tenant_id}",
    summary="A tenant's settings (operator)",
    responses=problem_responses(401, 403, 422),
)
def get_one_tenant(
    tenant_id: Annotated[TenantId, Path()], principal: Operator, session: SessionDep
) -> TenantOut:
    """The tenant's name and zone; the defaults (its id, `UTC`) for a tenant without a row."""
    return tenant_out(get_tenant(session, tenant_id))


@router.put(
    "/tenants/{tenant_id}",
    summary="Create or change a tenant's settings (operator)",
    responses={
        201: {"model": TenantOut, "description": "Created"},
        **problem_responses(400, 401, 403, 409, 413, 415, 422),
    },
)
def put_tenant(
    tenant_id: Annotated[TenantId, Path()],
    body: TenantIn,
    response: Response,
    principal: Operator,
    session: SessionDep,
) -> TenantOut:
    """200 with the tenant as stored, 201 when the row was created. A zone change is refused
    (409 `timezone-locked`) once the tenant has an invoice that is not void."""
    existed = session.get(Tenant, tenant_id) is not None
    info = set_tenant(session, tenant_id, name=body.name, timezone=body.timezone)
    session.commit()
    if not existed:
        response.status_code = 201
    return tenant_out(info)


def tenant_out(info: TenantInfo) -> TenantOut:
    """The API form of a tenant."""
    return TenantOut(id=info.id, name=info.name, timezone=info.timezone, created_at=info.created_at)
