"""The Dramatiq actors `billing.aggregate_daily`, `billing.generate_monthly_invoice` and
`billing.sync_invoice`.

This module is what the Procfile's worker runs (`dramatiq workers.actors`), so it is the one
place that reads `WorkerSettings` from the environment and builds the broker (`build_broker`).
Each actor takes the payload dict of its contract and calls its plain job function in
`workers.jobs`. Importing `billing` or `webhooks` never touches a broker; importing this module
does, by design.

The actors need a database: in a `dramatiq` worker process it is bound from `DATABASE_URL` when
the process boots, with the provider hook `PROVIDER_SYNC` names, and logging is configured
(`LOG_FORMAT`); an embedding process (`billing run`, tests) calls
`bind(session_factory, provider_sync=...)`. `attach(broker)` moves the actors to another broker
(a test's `StubBroker`, `billing demo`).

With a provider hook bound, `billing.generate_monthly_invoice` sends `billing.sync_invoice` for
its invoice once the invoice has committed; without one it sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dramatiq
from dramatiq import Broker, Message, Middleware

import webhooks as webhooks_outbox
from billing import ProviderSync
from billing.aggregation import utc_day_start
from billing.db import make_engine, make_session_factory
from billing.lifecycle import DEFAULT_POLICY, InvoicePolicy, Outbox
from billing.settings import BillingSettings
from workers.broker import actor_options, build_broker, sync_actor_options
from workers.jobs import (
    AGGREGATE_DAILY,
    FINALIZE_INVOICE,
    GENERATE_MONTHLY_INVOICE,
    PERMANENT_ERRORS,
    SYNC_INVOICE,
    SessionFactory,
    aggregate_daily_job,
    finalize_invoice_job,
    generate_monthly_invoice_job,
    sync_invoice_job,
)
from workers.logs import configure_logging
from workers.payloads import (
    AggregateDailyPayload,
    FinalizeInvoicePayload,
    MonthlyInvoicePayload,
    SyncInvoicePayload,
    parse_payload,
)
from workers.provider import load_provider_sync
from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Resources:
    session_factory: SessionFactory
    webhooks: Outbox
    provider_sync: ProviderSync | None
    policy: InvoicePolicy


_resources: _Resources | None = None


def bind(
    session_factory: SessionFactory,
    *,
    webhooks: Outbox = webhooks_outbox,
    provider_sync: ProviderSync | None = None,
    policy: InvoicePolicy = DEFAULT_POLICY,
) -> None:
    """Give the actors of this process their database, outbox, payment provider hook and
    invoice policy (`INVOICE_NUMBER_PREFIX`, `INVOICE_GRACE_PERIOD`)."""
    global _resources
    _resources = _Resources(
        session_factory=session_factory,
        webhooks=webhooks,
        provider_sync=provider_sync,
        policy=policy,
    )


def unbind() -> None:
    """Forget the bound database (tests)."""
    global _resources
    _resources = None


def _bound() -> _Resources:
    if _resources is None:
        raise RuntimeError(
            "workers.actors has no database: call workers.actors.bind(session_factory) "
            "(the dramatiq worker does it from DATABASE_URL at process boot)"
        )
    return _resources


class BindDatabaseOnBoot(Middleware):
    """In each `dramatiq` worker process, once it boots: configures logging (`LOG_FORMAT`),
    binds the actors to `DATABASE_URL` and loads the `PROVIDER_SYNC` hook.

    Raises:
        InvalidProviderSyncError: `PROVIDER_SYNC` names no usable hook (the process stops).
    """

    def after_process_boot(self, broker: Broker) -> None:
        configure_logging(settings)
        if _resources is None:
            database = BillingSettings()
            engine = make_engine(database.database_url, echo=database.sql_echo)
            logger.info("billing actors use %s", engine.url.render_as_string(hide_password=True))
            provider_sync = None
            if settings.provider_sync:
                provider_sync = load_provider_sync(settings.provider_sync)
                logger.info("invoices are synced by %s", settings.provider_sync)
            bind(
                make_session_factory(engine),
                provider_sync=provider_sync,
                policy=database.invoice_policy(),
            )


#: Read once: this module is the `dramatiq` command's entry point.
settings = WorkerSettings()
broker: Broker = build_broker(settings)
broker.add_middleware(BindDatabaseOnBoot())
dramatiq.set_broker(broker)

_OPTIONS = {**actor_options(settings), "throws": PERMANENT_ERRORS}
_SYNC_OPTIONS = {**sync_actor_options(settings), "throws": PERMANENT_ERRORS}


@dramatiq.actor(actor_name=AGGREGATE_DAILY, broker=broker, **_OPTIONS)
def aggregate_daily(payload: dict[str, Any]) -> None:
    """`{tenant_id, metric, day_start}`: upsert that day's total and announce it."""
    resources = _bound()
    aggregate_daily_job(resources.session_factory, payload, webhooks=resources.webhooks)


@dramatiq.actor(actor_name=GENERATE_MONTHLY_INVOICE, broker=broker, **_OPTIONS)
def generate_monthly_invoice(payload: dict[str, Any]) -> None:
    """`{tenant_id, period_start, period_end, currency}`: invoice the period once, announce it,
    then (with a provider hook) send `billing.sync_invoice` for it."""
    resources = _bound()
    generate_monthly_invoice_job(
        resources.session_factory,
        payload,
        webhooks=resources.webhooks,
        enqueue_sync=_enqueue_sync if resources.provider_sync is not None else None,
        policy=resources.policy,
    )


@dramatiq.actor(actor_name=SYNC_INVOICE, broker=broker, **_SYNC_OPTIONS)
def sync_invoice(payload: dict[str, Any]) -> None:
    """`{invoice_id}`: send the invoice to the payment provider once; store the provider's id."""
    resources = _bound()
    sync_invoice_job(resources.session_factory, payload, provider_sync=resources.provider_sync)


@dramatiq.actor(actor_name=FINALIZE_INVOICE, broker=broker, **_OPTIONS)
def finalize_invoice(payload: dict[str, Any]) -> None:
    """`{invoice_id}`: finalize a draft once its grace period ended (safe twice or at once),
    then (with a provider hook) send `billing.sync_invoice` for it."""
    resources = _bound()
    finalize_invoice_job(
        resources.session_factory,
        payload,
        webhooks=resources.webhooks,
        enqueue_sync=_enqueue_sync if resources.provider_sync is not None else None,
        policy=resources.policy,
    )


ACTORS = (aggregate_daily, generate_monthly_invoice, sync_invoice, finalize_invoice)


def options_for(actor: dramatiq.Actor[Any, Any], settings: WorkerSettings) -> dict[str, Any]:
    """The retry, time and age bounds `settings` give `actor` (`queue_name` included)."""
    if actor.actor_name == SYNC_INVOICE:
        return sync_actor_options(settings)
    return actor_options(settings)


def attach(new_broker: Broker, *, settings: WorkerSettings | None = None) -> Broker:
    """Declare the billing actors on `new_broker` and make it this module's and Dramatiq's broker.

    With `settings`, the actors also take that configuration's retry, time and age bounds.
    Returns the broker they were on, to attach back to.
    """
    global broker
    previous: Broker = aggregate_daily.broker
    for actor in ACTORS:
        if settings is not None:
            options = options_for(actor, settings)
            actor.queue_name = options.pop("queue_name")
            actor.options.update(options)
        actor.broker = new_broker
        new_broker.declare_actor(actor)
    dramatiq.set_broker(new_broker)
    broker = new_broker
    return previous


def enqueue_aggregate_daily(*, tenant_id: str, metric: str, day_start: datetime) -> Message[Any]:
    """Send `billing.aggregate_daily` for the tenant's local day containing `day_start`;
    return the message. A UTC `day_start` is sent as its UTC midnight (as before zones
    existed); one with another offset (the scheduler sends local midnights, e.g.
    `2025-03-09T00:00:00-05:00`) is sent as it is: the job finds the tenant's day.

    Raises:
        InvalidPayloadError: an empty field or a naive `day_start`; nothing is sent.
    """
    payload = {
        "tenant_id": tenant_id,
        "metric": metric,
        "day_start": _iso(day_start),
    }
    checked = parse_payload(AggregateDailyPayload, payload, job=AGGREGATE_DAILY)
    if day_start.utcoffset() == timedelta(0):
        payload["day_start"] = utc_day_start(checked.day_start).isoformat()
    return _send(aggregate_daily, payload)


def enqueue_generate_monthly_invoice(
    *, tenant_id: str, period_start: datetime, period_end: datetime, currency: str
) -> Message[Any]:
    """Send `billing.generate_monthly_invoice`; return the message.

    Raises:
        InvalidPayloadError: an empty field or a naive datetime; nothing is sent.
    """
    payload = {
        "tenant_id": tenant_id,
        "period_start": _iso(period_start),
        "period_end": _iso(period_end),
        "currency": currency,
    }
    parse_payload(MonthlyInvoicePayload, payload, job=GENERATE_MONTHLY_INVOICE)
    return _send(generate_monthly_invoice, payload)


def enqueue_sync_invoice(*, invoice_id: str) -> Message[Any]:
    """Send `billing.sync_invoice` for an invoice; return the message.

    Raises:
        InvalidPayloadError: an empty id; nothing is sent.
    """
    payload = {"invoice_id": invoice_id}
    parse_payload(SyncInvoicePayload, payload, job=SYNC_INVOICE)
    return _send(sync_invoice, payload)


def enqueue_finalize_invoice(*, invoice_id: str) -> Message[Any]:
    """Send `billing.finalize_invoice` for a draft invoice; return the message.

    Raises:
        InvalidPayloadError: an empty id; nothing is sent.
    """
    payload = {"invoice_id": invoice_id}
    parse_payload(FinalizeInvoicePayload, payload, job=FINALIZE_INVOICE)
    return _send(finalize_invoice, payload)


def _enqueue_sync(invoice_id: str) -> None:
    enqueue_sync_invoice(invoice_id=invoice_id)


def _iso(value: object) -> object:
    # A non-datetime is passed through so that `parse_payload` reports it with the others.
    return value.isoformat() if isinstance(value, datetime) else value


def _send(actor: dramatiq.Actor[Any, Any], payload: Mapping[str, Any]) -> Message[Any]:
    message: Message[Any] = actor.send(dict(payload))
    return message
