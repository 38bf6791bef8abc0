"""`BillingService`: one tenant's ledger operations inside the caller's transaction."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, tzinfo
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import webhooks
from billing import (
    adjustments,
    aggregation,
    credit_notes,
    invoicing,
    late_usage,
    ledger,
    lifecycle,
    metrics,
    preview,
    tenants,
)
from billing.errors import (
    BillingError,
    IdempotencyConflictError,
    InvalidPeriodError,
    InvalidUsageError,
    TooManyMetricsError,
)
from billing.ledger import Recorded
from billing.lifecycle import DEFAULT_POLICY, InvoicePolicy, Outbox
from billing.localtime import local_month
from billing.metric_limit import DEFAULT_MAX_METRICS_PER_TENANT, limit_for
from billing.models import CreditNote, Invoice
from billing.preview import InvoicePreview
from billing.provider_sync import ProviderSync, sync_to_provider
from billing.usage_lines import LineDraft
from webhooks.interfaces import NewEvent
from webhooks.sqltypes import utcnow

logger = logging.getLogger(__name__)


class BillingService:
    """Records usage, aggregates it and invoices it for one tenant.

    The caller owns `session` and its transaction: the service flushes, and never commits or
    rolls back, so its writes commit or fail together with the caller's own, the invoice
    events it writes to `outbox` among them. `now` is the clock that decides whether a period
    has ended, and usage more than 5 minutes after it is refused; so is usage older than
    `max_usage_age` when that is set (the HTTP API sets `USAGE_MAX_AGE`; the default, None,
    takes any past event, for imports and backfills). `policy` says how invoices are numbered
    and finalized, and what becomes of usage in a period already invoiced (`late_usage`).
    `max_metrics_per_tenant` caps the distinct metrics the tenant may have in a calendar month
    of its zone (None: no cap; see `billing.metric_limit`). `log_fields`: the caller's own
    log line (a job's, `workers.logs.job_log`); an invoice created or moved to a new status
    is noted there (`invoice_created`, `status`) instead of on an INFO line of its own.
    """

    def __init__(
        self,
        *,
        session: Session,
        tenant_id: str,
        provider_sync: ProviderSync | None = None,
        now: Callable[[], datetime] = utcnow,
        policy: InvoicePolicy = DEFAULT_POLICY,
        outbox: Outbox = webhooks,
        max_usage_age: timedelta | None = None,
        max_metrics_per_tenant: int | None = DEFAULT_MAX_METRICS_PER_TENANT,
        log_fields: dict[str, Any] | None = None,
    ) -> None:
        self.session = session
        self.log_fields = log_fields
        self.tenant_id = ledger.validate_tenant(tenant_id)
        self.provider_sync = provider_sync
        self.now = now
        self.policy = policy
        self.outbox = outbox
        self.max_usage_age = max_usage_age
        self.max_metrics_per_tenant = max_metrics_per_tenant

    def record_usage(
        self,
        *,
        metric: str,
        amount: int,
        at: datetime,
        idempotency_key: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Store one usage event once; return its id (the first id when sent again).

        A new event in the period of one of the tenant's draft invoices re-prices that draft
        (same id, lines replaced, its row locked) in the same transaction; so do batches.

        Raises:
            InvalidUsageError: a field is malformed (`.field` names it); nothing is stored.
            IdempotencyConflictError: the key was used for another amount or time.
            PeriodClosedError: `policy.late_usage` is `reject` and a finalized invoice covers
                `at`; nothing is stored.
            TooManyMetricsError: the metric is new to the event's month, which already has
                `max_metrics_per_tenant` metrics; nothing is stored.
        """
        return self.ingest_event(
            metric=metric,
            amount=amount,
            at=at,
            idempotency_key=idempotency_key,
            metadata=metadata,
        ).id

    def ingest_event(
        self,
        *,
        metric: str,
        amount: int,
        at: datetime,
        idempotency_key: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> Recorded:
        """`record_usage` that also says whether the event had been stored before."""
        event = self._validated(
            metric=metric,
            amount=amount,
            at=at,
            idempotency_key=idempotency_key,
            metadata=metadata,
            now=self.now(),
        )
        return self._store([event], batch=False)[0]

    def ingest_untimed(
        self,
        *,
        metric: str,
        amount: int,
        idempotency_key: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> Recorded:
        """`ingest_event` of an event sent without a time: stored at `now()`, unless its key is
        stored already with the same amount, which makes it a retry of that event (and its
        stored time its time: a duplicate, not a conflict).

        The usual case, a new key, is stored at once, without looking for the key first. Only
        when that finds the key taken (or the metric new to this month, past the limit) is the
        stored event looked up and the event recorded again at its time, exactly as
        `ingest_event` would have; that first try stores and counts nothing.
        """
        now = self.now()
        event = self._validated(
            metric=metric,
            amount=amount,
            at=now,
            idempotency_key=idempotency_key,
            metadata=metadata,
            now=now,
        )
        try:
            return self._store([event], batch=False, count_refusals=False)[0]
        except (IdempotencyConflictError, TooManyMetricsError):
            pass  # a retry, maybe: decide on the stored event's time
        stored = ledger.stored_events(self.session, self.tenant_id, [(metric, idempotency_key)])
        at = next((at for _, _, _, sent, at in stored if sent == amount), now)
        return self.ingest_event(
            metric=metric, amount=amount, at=at, idempotency_key=idempotency_key, metadata=metadata
        )

    def record_usage_batch(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        """Store many events (each a mapping of `record_usage`'s arguments); ids in order.

        Every event is validated before anything is stored: one bad event raises
        `InvalidUsageError` (its message gives the index) and stores nothing; so does one
        refused by `LATE_USAGE=reject` (`PeriodClosedError`, `.index` set), and
        `TooManyMetricsError` when the batch's new metrics bring a month over the limit.
        """
        return [recorded.id for recorded in self.ingest(events)]

    def ingest(self, events: Sequence[Mapping[str, Any]]) -> list[Recorded]:
        """`record_usage_batch` that also says, per event, whether it was a duplicate."""
        now = self.now()
        validated = [self._validate_item(index, item, now) for index, item in enumerate(events)]
        return self._store(validated, batch=True)

    def _store(
        self, events: list[ledger.UsageInput], *, batch: bool, count_refusals: bool = True
    ) -> list[Recorded]:
        late = self._late(events)
        if late and self.policy.late_usage == "reject":
            self._refuse_late(events, late, batch=batch)
        try:
            stored = self._record(events)
        except (IdempotencyConflictError, TooManyMetricsError):
            if count_refusals:
                metrics.USAGE_REJECTED.inc(len(events))
            raise
        results = stored.results
        duplicates = sum(r.duplicate for r in results)
        if duplicates:
            metrics.USAGE_DUPLICATE.inc(duplicates)
        metrics.USAGE_STORED.inc(len(results) - duplicates)
        if late and self.policy.late_usage == "ignore":
            ignored = sum(not results[index].duplicate for index in late)
            if ignored:
                metrics.LATE_USAGE_IGNORED.inc(ignored)
        if stored.drafts is None:
            new_times = [e.at for e, r in zip(events, results, strict=True) if not r.duplicate]
            drafts = invoicing.drafts_covering(self.session, self.tenant_id, new_times)
        else:
            drafts = stored.drafts
        for invoice_id in drafts:  # re-price the drafts holding new usage, in this transaction
            self._reprice(invoice_id)
        return results

    def _record(self, events: list[ledger.UsageInput]) -> ledger.Stored:
        """Store the events within the metric limit (`billing.metric_limit`)."""
        limit = self.max_metrics_per_tenant
        if limit is None:
            return ledger.store(self.session, self.tenant_id, events)
        checked = limit_for(self.session, self.tenant_id, events, limit)
        return ledger.store(self.session, self.tenant_id, events, metric_limit=checked)

    def _late(self, events: list[ledger.UsageInput]) -> dict[int, late_usage.ClosedPeriod]:
        """The events in closed periods, when the policy cares (`next_invoice` never looks)."""
        if self.policy.late_usage == "next_invoice":
            return {}
        return late_usage.late_indexes(self.session, self.tenant_id, [e.at for e in events])

    def _refuse_late(
        self,
        events: list[ledger.UsageInput],
        late: dict[int, late_usage.ClosedPeriod],
        *,
        batch: bool,
    ) -> None:
        """Raise for the first late event not stored before (a retry stays a duplicate)."""
        keys = [(events[i].metric, events[i].idempotency_key) for i in late]
        stored = late_usage.stored_keys(self.session, self.tenant_id, keys)
        for index, period in late.items():
            event = events[index]
            if (event.metric, event.idempotency_key) not in stored:
                metrics.USAGE_REJECTED.inc(len(events))
                raise late_usage.period_closed(period, event.at, index=index if batch else None)

    def aggregate_daily(self, *, metric: str, day_start: datetime) -> int:
        """Compute and upsert the total of `metric` over the tenant's local day containing
        `day_start` (midnight to midnight in its zone; its UTC day without one)."""
        return self.aggregate_local_day(metric=metric, day_start=day_start).total

    def aggregate_local_day(
        self, *, metric: str, day_start: datetime, announce: bool = False
    ) -> aggregation.DayTotal:
        """`aggregate_daily`, also returning the local midnight the day starts at; with
        `announce`, publishing `billing.usage_aggregated` to the SQL outbox as well."""
        metric = ledger.validate_stored_metric(metric)
        with metrics.timed_ms(metrics.AGGREGATE_DURATION_MS):
            return aggregation.aggregate_local_day(
                self.session, self.tenant_id, metric, day_start, announce=announce
            )

    def generate_monthly_invoice(
        self, *, period_start: datetime, period_end: datetime, currency: str, commit: bool = False
    ) -> str:
        """Create the invoice of `[period_start, period_end)` in `currency`, once; return its id.

        The invoice is created (`billing.invoice.created`) and, without a grace period,
        finalized (numbered, `billing.invoice.finalized`) in the caller's transaction; with
        `policy.grace_period` it stays a draft, re-priced from the usage known whenever it is
        generated again and when it is finalized. Called again (or by a racing worker) it
        returns the same id and creates nothing. A void invoice does not count: the period is
        invoiced anew.

        A tenant with a zone other than UTC (`billing.tenants`) is invoiced for periods from
        a local midnight to a local midnight (the scheduler sends its local months), and its
        events show the period with the zone's offset (`2025-03-01T00:00:00-05:00`).

        `commit`: the caller's transaction ends with this call (a job's own). On PostgreSQL an
        invoice created and finalized here then commits with its numbering statement, in one
        round trip (`billing.numbering`): the sequence's row, which every other finalizer
        waits for, is released by the server, not once this thread runs again. Nothing may run
        in the transaction after the call (its commit finds nothing left to send).

        Raises:
            InvalidPeriodError: naive or reversed period, a malformed currency, a period that
                has not ended by `now()`, or one whose bounds are not midnights in the
                tenant's zone; nothing is created.
            CurrencyMismatchError: the plan has prices, none in `currency`; nothing is created.
            ProviderSyncError: `provider_sync` failed; the invoice is flushed and stays.
        """
        currency = invoicing.check_period(period_start, period_end, currency)
        zone_name = tenants.zone_name_of(self.session, self.tenant_id, lock=True)
        tenants.check_period(zone_name, period_start, period_end)
        if period_end > self.now():
            raise InvalidPeriodError(
                f"the period {period_start.isoformat()} to {period_end.isoformat()} "
                "has not ended yet"
            )
        # With a grace period a draft is usually there, to re-price: look for it first.
        existing = (
            self._live(period_start, period_end, currency) if self.policy.grace_period else None
        )
        if existing is None:
            invoice, created = self._create(period_start, period_end, currency, zone_name)
        else:
            invoice, created = existing, False
        invoice_id = invoice.id
        if not created and invoice.status == "draft" and self.policy.grace_period:
            self._reprice(invoice_id)
        if not self.policy.grace_period:
            # Just priced: finalize as is; a draft left from a grace period is re-priced first;
            # one finalized already (open, paid, uncollectible) is returned as it is.
            if created:  # the row is ours since its insert: no lock to take
                last = commit and self.provider_sync is None  # nothing follows the number
                self._apply(invoice, lifecycle.FINALIZE, tenants.zone(zone_name), commit=last)
            # A finalized invoice never becomes a draft again: one found finalized is not
            # locked, as a racing run that has locked it (with the tenant's other finalized
            # invoices, in id order) may wait for the ones this run has locked.
            elif invoice.status == "draft" and self._locked(invoice_id).status == "draft":
                self.finalize_invoice(invoice_id)
        self.session.flush()
        if self.provider_sync is not None:
            self.sync_invoice(invoice_id)
        return invoice_id

    def _live(self, start: datetime, end: datetime, currency: str) -> Invoice | None:
        return invoicing.find_invoice(self.session, self.tenant_id, start, end, currency)

    def _create(
        self, start: datetime, end: datetime, currency: str, zone_name: str
    ) -> tuple[Invoice, bool]:
        """The period's invoice, created (priced, stored, announced: True) or found (False).

        No SELECT first: the insert's ON CONFLICT finds a live invoice (also one a racing run
        commits meanwhile), and pricing that fails, as when the plan changed since the period
        was invoiced, looks for one before it raises.
        """
        try:
            late, lines = self._priced(start, end, currency)
        except BillingError:
            found = self._live(start, end, currency)
            if found is None:
                raise
            return found, False
        zone = tenants.zone(zone_name)

        def created(invoice_id: str) -> NewEvent:
            return lifecycle.created_event(
                tenant_id=self.tenant_id,
                invoice_id=invoice_id,
                period_start=start.astimezone(zone),
                period_end=end.astimezone(zone),
                currency=currency,
            )

        # The SQL outbox stores the event with the invoice (on PostgreSQL in its statement);
        # another outbox is handed it once the invoice is stored.
        sql_outbox = self.outbox is webhooks
        new = invoicing.store_invoice(
            self.session,
            self.tenant_id,
            start,
            end,
            currency,
            lines,
            announce=created if sql_outbox else None,
        )
        if new is None:  # a racing run created it: find it, create nothing
            found = self._live(start, end, currency)
            assert found is not None, "the conflicting invoice must be visible once committed"
            return found, False
        self._credit_overbilled(late)
        metrics.INVOICES_GENERATED.inc()
        self._log(
            {"invoice_created": True}, "invoice %s created for tenant %s", new.id, self.tenant_id
        )
        if not sql_outbox:
            event = created(new.id)
            self.outbox.publish(self.session, event.topic, event.payload, event_id=event.id)
        return new, True

    def preview_invoice(
        self, *, period_start: datetime, period_end: datetime, currency: str
    ) -> InvoicePreview:
        """The lines and total an invoice of `[period_start, period_end)` in `currency` would
        have if generated now, from the usage known now, with the adjustment lines of late
        usage it would carry; stores nothing (no row, no event, no number). The period need
        not have ended.

        Raises:
            InvalidPeriodError: naive or reversed period, or a malformed currency.
            CurrencyMismatchError: the tenant's plans have prices, none in `currency`.
        """
        code = invoicing.check_period(period_start, period_end, currency)
        late = adjustments.adjustment_lines(self._late_for(period_start, period_end, code))
        return preview.preview(self.session, self.tenant_id, period_start, period_end, code, late)

    def _late_for(
        self, period_start: datetime, period_end: datetime, currency: str
    ) -> list[adjustments.Adjustment]:
        """The adjustments an invoice of the period would carry if generated now: none when a
        finalized one exists (generating returns it), a draft's own ones re-priced."""
        existing = invoicing.find_invoice(
            self.session, self.tenant_id, period_start, period_end, currency
        )
        if existing is not None and existing.status != "draft":
            return []
        exclude = existing.id if existing is not None else None
        return self._pending_adjustments(currency, lock=False, exclude=exclude)

    def preview_upcoming_invoice(self, *, currency: str) -> InvoicePreview:
        """`preview_invoice` of the invoice period containing `now()` (its usage so far): the
        tenant's local calendar month.

        Raises:
            InvalidPeriodError: a malformed currency.
            CurrencyMismatchError: the tenant's plans have prices, none in `currency`.
        """
        start, end = local_month(tenants.tenant_zone(self.session, self.tenant_id), self.now())
        return self.preview_invoice(period_start=start, period_end=end, currency=currency)

    def get_invoice(self, invoice_id: str) -> Invoice:
        """One of the tenant's invoices.

        Raises:
            UnknownInvoiceError: the tenant has no invoice with that id.
        """
        return lifecycle.own_invoice(self.session, self.tenant_id, invoice_id, lock=False)

    def finalize_invoice(self, invoice_id: str) -> Invoice:
        """`draft` → `open`: re-price the draft from its period's usage now, then give it its
        number; an open invoice is left as it is.

        Raises:
            UnknownInvoiceError: the tenant has no invoice with that id.
            InvoiceStateError: the invoice is paid, void or uncollectible.
        """
        self._reprice(invoice_id)
        return self._transition(invoice_id, lifecycle.FINALIZE)

    def _locked(self, invoice_id: str) -> Invoice:
        return lifecycle.own_invoice(self.session, self.tenant_id, invoice_id, lock=True)

    def _reprice(self, invoice_id: str) -> None:
        """Re-price the invoice (its row locked) if it is still a draft, with the late usage
        of earlier invoices pending now."""
        invoice = self._locked(invoice_id)
        if invoice.status == "draft":
            late = self._pending_adjustments(invoice.currency, exclude=invoice.id, lock=True)
            invoicing.reprice_draft(self.session, invoice, adjustments.adjustment_lines(late))
            self._credit_overbilled(late)

    def _priced(
        self, start: datetime, end: datetime, currency: str
    ) -> tuple[list[adjustments.Adjustment], list[LineDraft]]:
        """The late usage pending now (locked, see `_pending_adjustments`) and the lines of a
        new invoice of the period, its adjustment lines last: the finalized invoices' periods
        re-priced from the same read of the ledger as the period's."""
        if self.policy.late_usage == "ignore":
            return [], invoicing.price_lines(self.session, self.tenant_id, start, end, currency)
        late, lines = adjustments.pending_with_lines(
            self.session,
            self.tenant_id,
            currency,
            self.now(),
            lookback=self.policy.late_usage_lookback,
            period=(start, end),
        )
        return late, lines(adjustments.adjustment_lines(late))

    def pending_adjustments(self, *, currency: str) -> list[adjustments.Adjustment]:
        """What the tenant's next invoice in `currency` would bill (amount > 0) or credit
        (amount < 0) for late usage of its finalized invoices (`policy.late_usage_lookback`);
        none under `LATE_USAGE=ignore`. Stores nothing."""
        return self._pending_adjustments(invoicing.check_currency(currency), lock=False)

    def _pending_adjustments(
        self, currency: str, *, lock: bool, exclude: str | None = None
    ) -> list[adjustments.Adjustment]:
        if self.policy.late_usage == "ignore":
            return []
        return adjustments.pending_adjustments(
            self.session,
            self.tenant_id,
            currency,
            self.now(),
            lookback=self.policy.late_usage_lookback,
            exclude_invoice_id=exclude,
            lock=lock,
        )

    def _credit_overbilled(self, late: list[adjustments.Adjustment]) -> None:
        adjustments.credit_overbilled(
            self.session, self.tenant_id, late, now=self.now, outbox=self.outbox
        )

    def pay_invoice(self, invoice_id: str) -> Invoice:
        """`open` or `uncollectible` → `paid`, with `paid_at`; a paid invoice stays as it is.

        Raises:
            UnknownInvoiceError: the tenant has no invoice with that id.
            InvoiceStateError: the invoice is a draft or void.
        """
        return self._synced(self._transition(invoice_id, lifecycle.PAY))

    def mark_uncollectible(self, invoice_id: str) -> Invoice:
        """`open` → `uncollectible` (it may still be paid later).

        Raises:
            UnknownInvoiceError: the tenant has no invoice with that id.
            InvoiceStateError: the invoice is a draft, paid or void.
        """
        return self._transition(invoice_id, lifecycle.MARK_UNCOLLECTIBLE)

    def void_invoice(self, invoice_id: str) -> Invoice:
        """`draft`, `open` or `uncollectible` → `void`: the period may then be invoiced anew.

        Raises:
            UnknownInvoiceError: the tenant has no invoice with that id.
            InvoiceStateError: the invoice is paid.
        """
        return self._synced(self._transition(invoice_id, lifecycle.VOID))

    def create_credit_note(
        self,
        invoice_id: str,
        *,
        amount: int | None = None,
        lines: Sequence[Mapping[str, Any]] | None = None,
        reason: str,
    ) -> CreditNote:
        """Credit an `open` or `paid` invoice: `amount`, or `lines` (`{amount, invoice_line_id?,
        description?}`) adding up to it; numbered `CN-…`, announced by
        `billing.credit_note.created`.

        Raises:
            InvalidCreditNoteError: malformed amount, lines or reason; nothing is stored.
            UnknownInvoiceError: the tenant has no invoice with that id.
            InvoiceStateError: the invoice is a draft, void or uncollectible.
            CreditExceedsInvoiceError: its credit notes would exceed its total.
        """
        total, checked, text = credit_notes.validate(amount, lines, reason)
        return credit_notes.create(
            self.session,
            self.tenant_id,
            invoice_id,
            amount=total,
            lines=checked,
            reason=text,
            now=self.now,
            outbox=self.outbox,
        )

    def list_credit_notes(self, invoice_id: str) -> list[CreditNote]:
        """The credit notes of one of the tenant's invoices, oldest first.

        Raises:
            UnknownInvoiceError: the tenant has no invoice with that id.
        """
        return credit_notes.of_invoice(self.session, self.get_invoice(invoice_id).id)

    def _transition(self, invoice_id: str, transition: lifecycle.Transition) -> Invoice:
        invoice = lifecycle.own_invoice(self.session, self.tenant_id, invoice_id, lock=True)
        return self._apply(invoice, transition)

    def _apply(
        self,
        invoice: Invoice,
        transition: lifecycle.Transition,
        zone: tzinfo | None = None,
        *,
        commit: bool = False,
    ) -> Invoice:
        """Move a locked (or just inserted) invoice through `transition` (`lifecycle.apply`)."""
        if lifecycle.apply(
            self.session,
            invoice,
            transition,
            now=self.now,
            policy=self.policy,
            outbox=self.outbox,
            zone=zone,
            commit=commit,
        ):
            self._log({"status": invoice.status}, "invoice %s is %s", invoice.id, invoice.status)
        return invoice

    def _log(self, fields: dict[str, Any], message: str, *args: object) -> None:
        """An invoice's change: added to `log_fields` when the caller gave them (its one
        line; formatting and writing a line is a tenth of an invoice job's CPU), else logged."""
        if self.log_fields is None:
            logger.info(message, *args)
        else:
            self.log_fields.update(fields)

    def _synced(self, invoice: Invoice) -> Invoice:
        """With `provider_sync`, report the invoice's new status to the provider now."""
        if self.provider_sync is not None:
            self.sync_invoice(invoice.id)
        return invoice

    def sync_invoice(self, invoice_id: str) -> str | None:
        """Bring `provider_sync` in line with a finalized invoice; return its provider id.

        An invoice not sent yet is sent (and the id returned stored); then a paid or void one
        is reported to a hook that supports it (`pay` / `void`), once. A draft is not sent: it
        may still change; a void invoice never sent is not sent. See `billing.provider_sync`.

        Raises:
            ProviderSyncError: the hook raised; what reached the provider before is kept.
        """
        invoice = self.session.execute(
            select(Invoice).where(Invoice.id == invoice_id, Invoice.tenant_id == self.tenant_id)
        ).scalar_one()
        if self.provider_sync is None:
            return invoice.provider_invoice_id
        return sync_to_provider(self.session, invoice, self.provider_sync)

    def _validated(self, **fields: Any) -> ledger.UsageInput:
        try:
            return ledger.validate_usage(**fields, max_age=self.max_usage_age)
        except InvalidUsageError:
            metrics.USAGE_REJECTED.inc()
            raise

    def _validate_item(
        self, index: int, item: Mapping[str, Any], now: datetime
    ) -> ledger.UsageInput:
        if type(item) is not dict and not isinstance(item, Mapping):  # dict: no ABC check
            metrics.USAGE_REJECTED.inc()
            raise InvalidUsageError(f"events[{index}] must be a mapping", field=f"events[{index}]")
        try:
            return self._validated(
                metric=item.get("metric"),
                amount=item.get("amount"),
                at=item.get("at"),
                idempotency_key=item.get("idempotency_key"),
                metadata=item.get("metadata"),
                now=now,
            )
        except InvalidUsageError as error:
            raise InvalidUsageError(
                f"events[{index}]: {error}", field=f"events[{index}].{error.field}"
            ) from error
