"""Per-request dependencies: the API's configuration (set by `add_billing`) and a session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

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


def get_session(api: ApiDep) -> Iterator[Session]:
    """One session per request; endpoints that write commit it themselves."""
    with api.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
