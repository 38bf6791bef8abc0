"""Per-request dependencies: the API's configuration (set by `add_billing`) and a session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Annotated

from anyio import CancelScope
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from billing.api.keycache import KeyLookup
from billing.late_usage import LateUsage
from billing.lifecycle import DEFAULT_POLICY, InvoicePolicy
from billing.metric_limit import DEFAULT_MAX_METRICS_PER_TENANT
from webhooks.sqltypes import utcnow


@dataclass(frozen=True)
class BillingApi:
    """What the routes and `require_quota` need, kept on `app.state.billing_api`.
    `api_keys`: callers authenticate with API keys (no `principal=` given to `add_billing`),
    found by `keys` (which may cache them, see `billing.api.keycache`)."""

    session_factory: sessionmaker[Session]
    prefix: str = "/_billing"
    clock: Callable[[], datetime] = field(default=utcnow)
    api_keys: bool = True
    usage_max_age: timedelta = timedelta(days=35)
    late_usage: LateUsage = "next_invoice"
    keys: KeyLookup = field(default_factory=KeyLookup)
    max_metrics_per_tenant: int | None = DEFAULT_MAX_METRICS_PER_TENANT
    invoice_policy: InvoicePolicy = DEFAULT_POLICY

    def policy(self) -> InvoicePolicy:
        """How invoices are numbered and finalized here, with this API's `late_usage`."""
        return replace(self.invoice_policy, late_usage=self.late_usage)


async def get_api(request: Request) -> BillingApi:
    """The configuration `add_billing(app, ...)` stored on the app (async: no thread hop)."""
    api = getattr(request.app.state, "billing_api", None)
    if not isinstance(api, BillingApi):
        raise RuntimeError("call billing.api.add_billing(app, session_factory=...) first")
    return api


ApiDep = Annotated[BillingApi, Depends(get_api)]


async def get_session(api: ApiDep) -> AsyncIterator[Session]:
    """One session per request; endpoints that write commit it themselves.

    Async, so opening it (no I/O: the connection is taken at the first statement) and closing
    it after a commit (nothing left to roll back) cost no trip through the thread pool; a
    session still in a transaction (a read, an error) is rolled back and closed in a thread.
    """
    session = api.session_factory()
    try:
        yield session
    finally:
        with CancelScope(shield=True):  # a client gone mid-request still frees the connection
            if session.in_transaction():
                await run_in_threadpool(session.close)
            else:
                session.close()


SessionDep = Annotated[Session, Depends(get_session)]
