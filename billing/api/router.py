"""The `/_billing` router: every resource's routes in one `APIRouter`."""

from __future__ import annotations

from fastapi import APIRouter

from billing.api.routes import catalog, invoices, meters, quotas, subscriptions, usage


def build_router() -> APIRouter:
    """A fresh router with all billing routes (mount it with `add_billing`)."""
    router = APIRouter()
    for module in (usage, catalog, meters, subscriptions, invoices, quotas):
        router.include_router(module.router)
    return router
