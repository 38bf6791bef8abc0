"""Meters: read by tenants and operators, declared by operators (shared by every tenant, like
plans)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from billing.api.auth import CatalogueReader, Operator
from billing.api.deps import SessionDep
from billing.api.problems import problem_responses
from billing.api.schemas import MeterIn, MeterList, MeterOut
from billing.meters import MeterSpec, declare_meter, list_meters
from billing.models import Meter

router = APIRouter(tags=["meters"])


@router.get(
    "/meters",
    summary="Declared meters (a metric not listed is a sum)",
    responses=problem_responses(401, 403),
)
def get_meters(principal: CatalogueReader, session: SessionDep) -> MeterList:
    """Every declared meter, by key."""
    return MeterList(items=[meter_out(spec) for spec in list_meters(session)])


@router.post(
    "/meters",
    status_code=201,
    summary="Declare or change a meter (operator)",
    responses={
        200: {"model": MeterOut, "description": "Changed"},
        **problem_responses(400, 401, 403, 413, 415, 422),
    },
)
def put_meter(
    body: MeterIn, response: Response, principal: Operator, session: SessionDep
) -> MeterOut:
    """201 for a new meter, 200 when it replaced one. Days already aggregated keep their totals
    until aggregated again."""
    existed = session.get(Meter, body.key) is not None
    spec = declare_meter(
        session,
        key=body.key,
        aggregation=body.aggregation,
        property=body.property,
        group_by=body.group_by,
    )
    session.commit()
    if existed:
        response.status_code = 200
    return meter_out(spec)


def meter_out(spec: MeterSpec) -> MeterOut:
    """The API form of a meter."""
    return MeterOut(
        key=spec.key,
        aggregation=spec.aggregation,
        property=spec.property,
        group_by=list(spec.group_by),
    )
