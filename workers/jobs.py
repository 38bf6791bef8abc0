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
  It never calls the payment provider: once the invoice has committed, it hands the id to
  `enqueue_sync` (the actors send `billing.sync_invoice`), so invoicing never waits on the
  provider. If that send fails, the job fails and is retried (harmlessly), and the scheduler's
  sweep of unsynced invoices (`PROVIDER_SYNC`) sends it later anyway.
- `billing.sync_invoice`: locks the invoice row, calls the provider hook unless the invoice
  already has a provider id, and stores the id returned; a paid or void invoice is then
  reported to a hook that has `pay` / `void`, once; the provider's own idempotency keys
  (see `billing.providers.stripe`) make a sync that died after the provider answered safe.
- `billing.finalize_invoice`: locks a draft, re-prices and numbers it (`billing.invoice.finalized`);
  an invoice no longer a draft is left alone, so a second or concurrent run changes nothing.

Each run logs one line (`workers.logs.job_log`): job, outcome, duration, tenant and ids. An
invoice job's line also carries what the service would log on lines of its own:
`invoice_created=True` for an invoice it created, `status=open` for one it finalized.

The Dramatiq actors (`workers.actors`) call these functions; `make_billing_job_handler` runs the
same code for teams that drive the jobs from another queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import webhooks as webhooks_outbox
from billing import BillingService, ProviderSync, lifecycle
from billing.aggregated_event import USAGE_AGGREGATED, aggregate_event_id, aggregated_payload
from billing.errors import PERMANENT_ERRORS as BILLING_PERMANENT_ERRORS
from billing.lifecycle import DEFAULT_POLICY, InvoicePolicy, Outbox
from billing.models import Invoice
from webhooks.errors import PERMANENT_ERRORS as WEBHOOK_PERMANENT_ERRORS
from webhooks.sqltypes import utcnow
from workers.errors import (
    InvalidPayloadError,
    InvoiceNotFoundError,
    ProviderSyncNotConfiguredError,
    UnknownJobError,
)
from workers.logs import job_log
from workers.payloads import (
    AggregateDailyPayload,
    FinalizeInvoicePayload,
    MonthlyInvoicePayload,
    P,
    SyncInvoicePayload,
    parse_payload,
)

logger = logging.getLogger(__name__)

AGGREGATE_DAILY = "billing.aggregate_daily"
GENERATE_MONTHLY_INVOICE = "billing.generate_monthly_invoice"
SYNC_INVOICE = "billing.sync_invoice"
FINALIZE_INVOICE = "billing.finalize_invoice"
INVOICE_CREATED = lifecycle.INVOICE_CREATED

#: Errors retrying cannot fix: the actors' `throws=`, dead-lettered at once.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    InvalidPayloadError,
    UnknownJobError,
    InvoiceNotFoundError,
    ProviderSyncNotConfiguredError,
    *BILLING_PERMANENT_ERRORS,
    *WEBHOOK_PERMANENT_ERRORS,
)


SessionFactory = sessionmaker[Session]


def aggregate_daily_job(
    session_factory: SessionFactory,
    payload: Mapping[str, Any],
    *,
    webhooks: Outbox = webhooks_outbox,
) -> int:
    """Upsert a tenant's daily total of a metric and announce it; return the total.

    The day is the tenant's local day containing the payload's `day_start`. Publishes
    `billing.usage_aggregated {tenant_id, metric, day_start, total}` in the same transaction,
    `day_start` being the local midnight with the zone's offset (`+00:00` for UTC); a re-run
    with an unchanged total publishes nothing new.

    Raises:
        InvalidPayloadError: the payload breaks the contract; nothing ran.
    """
    with job_log(logger, AGGREGATE_DAILY, permanent=PERMANENT_ERRORS) as log:
        job = _parse(AggregateDailyPayload, payload, AGGREGATE_DAILY)
        log.update(tenant_id=job.tenant_id, metric=job.metric)
        # The SQL outbox is written by the aggregation itself (on PostgreSQL in the upsert's
        # own statement); another outbox is handed the event.
        sql_outbox = webhooks is webhooks_outbox
        with session_factory.begin() as session:
            service = BillingService(session=session, tenant_id=job.tenant_id)
            day = service.aggregate_local_day(
                metric=job.metric, day_start=job.day_start, announce=sql_outbox
            )
            total, day_start = day.total, day.day_start.isoformat()
            log["day_start"] = day_start
            if not sql_outbox:
                event = aggregated_payload(job.tenant_id, job.metric, day_start, total)
                webhooks.publish(
                    session, USAGE_AGGREGATED, event, event_id=aggregate_event_id(event)
                )
        log["total"] = total
    return total


def generate_monthly_invoice_job(
    session_factory: SessionFactory,
    payload: Mapping[str, Any],
    *,
    webhooks: Outbox = webhooks_outbox,
    enqueue_sync: Callable[[str], object] | None = None,
    policy: InvoicePolicy = DEFAULT_POLICY,
    now: Callable[[], datetime] = utcnow,
) -> str:
    """Create a tenant's invoice for a period and currency, once, and announce it; return its id.

    The service publishes `billing.invoice.created {tenant_id, invoice_id, period_start,
    period_end, currency}` (and, finalizing it, `billing.invoice.finalized`) in the same
    transaction, with ids derived from the invoice's: one event each however often the job
    runs. After the commit, `enqueue_sync(invoice_id)` (when given) asks for the invoice's
    provider sync, unless it is a draft; the provider itself is never called here.

    Raises:
        InvalidPayloadError: the payload breaks the contract; nothing ran.
        InvalidPeriodError, CurrencyMismatchError: the service refused the period (also one
            that has not ended by `now()`) or currency.
        Whatever `enqueue_sync` raises (a broker outage), after the commit: running the job
            again is harmless and sends the sync again.
    """
    with job_log(logger, GENERATE_MONTHLY_INVOICE, permanent=PERMANENT_ERRORS) as log:
        job = _parse(MonthlyInvoicePayload, payload, GENERATE_MONTHLY_INVOICE)
        log.update(
            tenant_id=job.tenant_id,
            period_start=job.period_start.isoformat(),
            currency=job.currency.lower(),
        )
        # `invoice_created`, `status`: on the job's one line once committed (a job that fails
        # after creating the invoice rolls it back: its line does not say it created one)
        changes: dict[str, Any] = {}
        with session_factory.begin() as session:
            service = BillingService(
                session=session,
                tenant_id=job.tenant_id,
                now=now,
                policy=policy,
                outbox=webhooks,
                log_fields=changes,
            )
            # The transaction ends with the call: a new invoice commits with its number.
            invoice_id = service.generate_monthly_invoice(
                period_start=job.period_start,
                period_end=job.period_end,
                currency=job.currency,
                commit=True,
            )
            draft = False
            # A draft is not synced; without a grace period the invoice returned is finalized
            # (and maybe committed). Read it only then (the service keeps no reference to it,
            # so this may be a SELECT).
            if enqueue_sync is not None and policy.grace_period:
                invoice = session.get(Invoice, invoice_id)
                draft = invoice is not None and invoice.status == "draft"
        log.update(changes, invoice_id=invoice_id)
        if enqueue_sync is not None and not draft:
            enqueue_sync(invoice_id)
            log["sync"] = "enqueued"
    return invoice_id


def finalize_invoice_job(
    session_factory: SessionFactory,
    payload: Mapping[str, Any],
    *,
    webhooks: Outbox = webhooks_outbox,
    enqueue_sync: Callable[[str], object] | None = None,
    policy: InvoicePolicy = DEFAULT_POLICY,
    now: Callable[[], datetime] = utcnow,
) -> str:
    """Finalize a draft invoice (of any tenant): re-price it, number it, announce it.

    Safe twice or concurrently: the invoice row is locked, and an invoice that is no longer a
    draft (finalized by another run, or voided meanwhile) is left as it is. Returns the
    invoice's status afterwards. After the commit, `enqueue_sync(invoice_id)` asks for the
    provider sync of an invoice this run finalized.

    Raises:
        InvalidPayloadError: the payload breaks the contract; nothing ran.
        InvoiceNotFoundError: no invoice has that id.
    """
    with job_log(logger, FINALIZE_INVOICE, permanent=PERMANENT_ERRORS) as log:
        job = _parse(FinalizeInvoicePayload, payload, FINALIZE_INVOICE)
        log["invoice_id"] = job.invoice_id
        with session_factory.begin() as session:
            row = session.execute(
                select(Invoice.tenant_id, Invoice.status).where(Invoice.id == job.invoice_id)
            ).one_or_none()
            if row is None:
                raise InvoiceNotFoundError(f"no invoice {job.invoice_id!r} to finalize")
            log["tenant_id"] = row.tenant_id
            service = BillingService(
                session=session, tenant_id=row.tenant_id, now=now, policy=policy, outbox=webhooks
            )
            before = service.get_invoice(job.invoice_id).status
            status = before
            if before == "draft":
                status = service.finalize_invoice(job.invoice_id).status
        log.update(status=status, finalized=before != status)
        if before != status and enqueue_sync is not None:
            enqueue_sync(job.invoice_id)
            log["sync"] = "enqueued"
    return status


def sync_invoice_job(
    session_factory: SessionFactory,
    payload: Mapping[str, Any],
    *,
    provider_sync: ProviderSync | None,
) -> str | None:
    """Bring the payment provider in line with an invoice (of any tenant); return its id there.

    In one transaction: lock the invoice row (concurrent syncs of one invoice take turns); send
    it unless it already has a provider id, storing the id returned; then, when it is paid or
    void and the hook has `pay` / `void`, tell the provider once (`provider_status`).

    Raises:
        InvalidPayloadError: the payload breaks the contract; nothing ran.
        InvoiceNotFoundError: no invoice has that id.
        ProviderSyncNotConfiguredError: `provider_sync` is None.
        ProviderSyncError: the provider hook failed (transient: retried); nothing is stored.
    """
    with job_log(logger, SYNC_INVOICE, permanent=PERMANENT_ERRORS) as log:
        job = _parse(SyncInvoicePayload, payload, SYNC_INVOICE)
        log["invoice_id"] = job.invoice_id
        if provider_sync is None:
            raise ProviderSyncNotConfiguredError(
                f"{SYNC_INVOICE} for invoice {job.invoice_id}: this worker has no PROVIDER_SYNC"
            )
        with session_factory.begin() as session:
            invoice = session.execute(
                select(Invoice).where(Invoice.id == job.invoice_id).with_for_update()
            ).scalar_one_or_none()
            if invoice is None:
                raise InvoiceNotFoundError(f"no invoice {job.invoice_id!r} to sync")
            log["tenant_id"] = invoice.tenant_id
            already = invoice.provider_invoice_id
            service = BillingService(
                session=session, tenant_id=invoice.tenant_id, provider_sync=provider_sync
            )
            provider_invoice_id = service.sync_invoice(invoice.id)
        log.update(provider_invoice_id=provider_invoice_id, already_synced=already is not None)
    return provider_invoice_id


BillingJobHandler = Callable[[str, Mapping[str, Any]], object]
"""Runs a billing job by name: `handler("billing.aggregate_daily", payload)`."""


def make_billing_job_handler(
    *,
    session_factory: SessionFactory,
    webhooks: Outbox = webhooks_outbox,
    provider_sync: ProviderSync | None = None,
    enqueue_sync: Callable[[str], object] | None = None,
    policy: InvoicePolicy = DEFAULT_POLICY,
) -> BillingJobHandler:
    """A callable `(job_name, payload)` that runs the named job with these collaborators.

    For teams that drive the jobs from a queue of their own; it runs exactly the code the
    Dramatiq actors run and returns the job's result (a total, an invoice id, a provider id).
    `enqueue_sync(invoice_id)` is how a committed invoice asks that queue for its
    `billing.sync_invoice` job, which runs with `provider_sync`.

    Raises (from the returned callable):
        UnknownJobError: no job has that name (it is never silently acknowledged).
        InvalidPayloadError: the payload breaks the job's contract.
    """
    jobs: dict[str, Callable[[Mapping[str, Any]], object]] = {
        AGGREGATE_DAILY: lambda p: aggregate_daily_job(session_factory, p, webhooks=webhooks),
        GENERATE_MONTHLY_INVOICE: lambda p: generate_monthly_invoice_job(
            session_factory, p, webhooks=webhooks, enqueue_sync=enqueue_sync, policy=policy
        ),
        SYNC_INVOICE: lambda p: sync_invoice_job(session_factory, p, provider_sync=provider_sync),
        FINALIZE_INVOICE: lambda p: finalize_invoice_job(
            session_factory, p, webhooks=webhooks, enqueue_sync=enqueue_sync, policy=policy
        ),
    }

    def handle(job_name: str, payload: Mapping[str, Any]) -> object:
        job = jobs.get(job_name)
        if job is None:
            raise UnknownJobError(f"unknown billing job {job_name!r}; known: {sorted(jobs)}")
        return job(payload)

    return handle


def _parse(model: type[P], payload: object, job: str) -> P:
    try:
        return parse_payload(model, payload, job=job)
    except InvalidPayloadError as error:
        logger.error("%s not run: %s (payload %r)", job, error, payload)
        raise
