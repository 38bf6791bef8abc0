"""The `/_billing` router: every resource's routes in one `APIRouter`."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from billing.api.bodies import require_json
from billing.api.routes import (
    catalog,
    invoices,
    meters,
    quotas,
    subscriptions,
    tenants,
    usage,
)


def build_router() -> APIRouter:
    """A fresh router with all billing routes (mount it with `add_billing`); bodies must be
    JSON (415 otherwise)."""
    router = APIRouter(dependencies=[Depends(require_json)])
    for module in (usage, catalog, meters, tenants, subscriptions, invoices, quotas):
        router.include_router(module.router)
    return router
