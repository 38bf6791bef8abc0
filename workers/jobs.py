"""The billing jobs: one plain function per job, each one database transaction.

A job validates its payload, then in a single `with session_factory.begin() as session:` calls
`BillingService` and publishes its outbox event through `webhooks.publish`, so the change and the
event announcing it commit together or not at all. Event ids are stable, which makes every job
safe to run twice, concurrently or after a crash:

- `billing.aggregate_daily`: the event id is derived from (tenant, metric, day, total). A re-run
  that finds the same total publishes the same id, stored once: nothing new. A re-run that finds
  a new total (late events) publishes one new event carrying that total.
- `billing.generate_monthly_invoice`: the service returns the one invoice of (tenant, period,
  currency); the event id is derived from that invoice id, so there is one event per invoice.

The Dramatiq actors (`workers.actors`) call these functions; `make_billing_job_handler` runs the
same code for teams that drive the jobs from another queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

import webhooks as webhooks_outbox
from billing import BillingService
from billing.aggregation import utc_day_start
from billing.errors import PERMANENT_ERRORS as BILLING_PERMANENT_ERRORS
from webhooks.errors import PERMANENT_ERRORS as WEBHOOK_PERMANENT_ERRORS
from workers.errors import InvalidPayloadError, UnknownJobError
from workers.payloads import AggregateDailyPayload, MonthlyInvoicePayload, P, parse_payload

logger = logging.getLogger(__name__)

AGGREGATE_DAILY = "billing.aggregate_daily"
GENERATE_MONTHLY_INVOICE = "billing.generate_monthly_invoice"
USAGE_AGGREGATED = "billing.usage_aggregated"
INVOICE_CREATED = "billing.invoice.created"

#: Errors retrying cannot fix: the actors' `throws=`, dead-lettered at once.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    InvalidPayloadError,
    UnknownJobError,
    *BILLING_PERMANENT_ERRORS,
    *WEBHOOK_PERMANENT_ERRORS,
)


class Outbox(Protocol):
    """Where jobs publish their events: the `webhooks` module itself, or anything alike."""

    def publish(
        self,
        session: Session,
        topic: str,
        payload: Mapping[str, Any],
        *,
        event_id: str | None = None,
    ) -> str: ...


SessionFactory = sessionmaker[Session]


def aggregate_daily_job(
    session_factory: SessionFactory,
    payload: Mapping[str, Any],
    *,
    webhooks: Outbox = webhooks_outbox,
) -> int:
    """Upsert a tenant's daily total of a metric and announce it; return the total.

    Publishes `billing.usage_aggregated {tenant_id, metric, day_start, total}` in the same
    transaction; a re-run with an unchanged total publishes nothing new.

    Raises:
        InvalidPayloadError: the payload breaks the contract; nothing ran.
    """
    job = _parse(AggregateDailyPayload, payload, AGGREGATE_DAILY)
    day_start = utc_day_start(job.day_start)
    with session_factory.begin() as session:
        service = BillingService(session=session, tenant_id=job.tenant_id)
        total = service.aggregate_daily(metric=job.metric, day_start=day_start)
        event = {
            "tenant_id": job.tenant_id,
            "metric": job.metric,
            "day_start": day_start.isoformat(),
            "total": total,
        }
        webhooks.publish(session, USAGE_AGGREGATED, event, event_id=aggregate_event_id(event))
    logger.debug(
        "aggregated %s of tenant %s on %s: %d", job.metric, job.tenant_id, day_start.date(), total
    )
    return total


def generate_monthly_invoice_job(
    session_factory: SessionFactory,
    payload: Mapping[str, Any],
    *,
    webhooks: Outbox = webhooks_outbox,
) -> str:
    """Create a tenant's invoice for a period and currency, once, and announce it; return its id.

    Publishes `billing.invoice.created {tenant_id, invoice_id, period_start, period_end,
    currency}` in the same transaction, with an id derived from the invoice's: one event per
    invoice however often the job runs.

    Raises:
        InvalidPayloadError: the payload breaks the contract; nothing ran.
        InvalidPeriodError, CurrencyMismatchError: the service refused the period or currency.
    """
    job = _parse(MonthlyInvoicePayload, payload, GENERATE_MONTHLY_INVOICE)
    with session_factory.begin() as session:
        service = BillingService(session=session, tenant_id=job.tenant_id)
        invoice_id = service.generate_monthly_invoice(
            period_start=job.period_start, period_end=job.period_end, currency=job.currency
        )
        event = {
            "tenant_id": job.tenant_id,
            "invoice_id": invoice_id,
            "period_start": job.period_start.isoformat(),
            "period_end": job.period_end.isoformat(),
            "currency": job.currency.lower(),
        }
        webhooks.publish(session, INVOICE_CREATED, event, event_id=invoice_event_id(invoice_id))
    logger.debug("invoice %s of tenant %s announced", invoice_id, job.tenant_id)
    return invoice_id


def aggregate_event_id(event: Mapping[str, Any]) -> str:
    """The stable id of a `billing.usage_aggregated` event: a digest of what it says."""
    key = [event["tenant_id"], event["metric"], event["day_start"], event["total"]]
    digest = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()
    return f"usage_aggregated_{digest[:40]}"


def invoice_event_id(invoice_id: str) -> str:
    """The stable id of the `billing.invoice.created` event of an invoice."""
    return f"invoice_created_{invoice_id}"


BillingJobHandler = Callable[[str, Mapping[str, Any]], object]
"""Runs a billing job by name: `handler("billing.aggregate_daily", payload)`."""


def make_billing_job_handler(
    *, session_factory: SessionFactory, webhooks: Outbox = webhooks_outbox
) -> BillingJobHandler:
    """A callable `(job_name, payload)` that runs the named job with these collaborators.

    For teams that drive the jobs from a queue of their own; it runs exactly the code the
    Dramatiq actors run and returns the job's result (a total, an invoice id).

    Raises (from the returned callable):
        UnknownJobError: no job has that name (it is never silently acknowledged).
        InvalidPayloadError: the payload breaks the job's contract.
    """
    jobs: dict[str, Callable[..., object]] = {
        AGGREGATE_DAILY: aggregate_daily_job,
        GENERATE_MONTHLY_INVOICE: generate_monthly_invoice_job,
    }

    def handle(job_name: str, payload: Mapping[str, Any]) -> object:
        job = jobs.get(job_name)
        if job is None:
            raise UnknownJobError(f"unknown billing job {job_name!r}; known: {sorted(jobs)}")
        return job(session_factory, payload, webhooks=webhooks)

    return handle


def _parse(model: type[P], payload: object, job: str) -> P:
    try:
        return parse_payload(model, payload, job=job)
    except InvalidPayloadError as error:
        logger.error("%s not run: %s (payload %r)", job, error, payload)
        raise
