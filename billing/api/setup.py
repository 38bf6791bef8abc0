"""`add_billing(app)`: mount the billing API on a FastAPI app."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from billing.api.auth import get_principal
from billing.api.bodies import (
    DEFAULT_MAX_BATCH_REQUEST_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    BodyLimitMiddleware,
)
from billing.api.deps import BillingApi
from billing.api.keycache import KeyLookup
from billing.api.openapi import install_openapi
from billing.api.problems import ProblemError, register_error_handlers
from billing.api.router import build_router
from billing.late_usage import LateUsage
from billing.lifecycle import DEFAULT_POLICY, InvoicePolicy
from billing.metric_limit import DEFAULT_MAX_METRICS_PER_TENANT
from webhooks.sqltypes import utcnow


def add_billing(
    app: FastAPI,
    *,
    session_factory: sessionmaker[Session] | None = None,
    prefix: str = "/_billing",
    principal: Callable[..., Any] | None = None,
    clock: Callable[[], datetime] = utcnow,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_request_bytes: int = DEFAULT_MAX_BATCH_REQUEST_BYTES,
    usage_max_age: timedelta = timedelta(days=35),
    late_usage: LateUsage = "next_invoice",
    keys: KeyLookup | None = None,
    max_metrics_per_tenant: int | None = DEFAULT_MAX_METRICS_PER_TENANT,
    invoice_policy: InvoicePolicy = DEFAULT_POLICY,
) -> None:
    """Mount the billing routes under `prefix` and configure them and `require_quota`.

    `session_factory` defaults to one on `DATABASE_URL` (`BillingSettings`). `principal`, any
    FastAPI dependency returning a `billing.api.Principal`, replaces API-key authentication
    everywhere (billing routes and `require_quota`). Request bodies are JSON (else 415) of at
    most `max_request_bytes`, or `max_batch_request_bytes` for `/usage/batch` (else 413; see
    `billing.api.bodies`). The problem+json handlers are registered unless the app already has
    them (`register_error_handlers`). Usage whose `at` is older than `usage_max_age` (or over
    5 minutes ahead of `clock`) is refused with 422; with `late_usage="reject"`, usage in a
    period that has a finalized invoice is refused with 409 (`billing.late_usage`). `keys`
    finds the API keys: by default one indexed lookup per request; `billing.app` passes a
    cached one when Redis is configured. A metric new to a (local) month that already has
    `max_metrics_per_tenant` metrics of the tenant is refused with 422 (None: no limit).
    The invoice routes (finalize, pay, void, credit notes, the preview) follow `clock` and
    `invoice_policy` (`INVOICE_NUMBER_PREFIX`, `INVOICE_GRACE_PERIOD`, `LATE_USAGE_LOOKBACK`).
    """
    if session_factory is None:
        from billing.db import make_engine, make_session_factory
        from billing.settings import BillingSettings

        settings = BillingSettings()
        session_factory = make_session_factory(
            make_engine(settings.database_url, echo=settings.sql_echo)
        )
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    app.state.billing_api = BillingApi(
        session_factory=session_factory,
        prefix=prefix,
        clock=clock,
        api_keys=principal is None,
        usage_max_age=usage_max_age,
        late_usage=late_usage,
        keys=keys or KeyLookup(),
        max_metrics_per_tenant=max_metrics_per_tenant,
        invoice_policy=invoice_policy,
    )
    if principal is not None:
        app.dependency_overrides[get_principal] = principal
    if ProblemError not in app.exception_handlers:
        register_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        prefix=prefix or "/",
        max_bytes=max_request_bytes,
        overrides={f"{prefix}/usage/batch": max_batch_request_bytes},
    )
    app.include_router(build_router(), prefix=prefix)
    install_openapi(app)
