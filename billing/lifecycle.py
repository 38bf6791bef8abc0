"""Invoice states and the transitions between them, each announced by exactly one event.

```
draft ──finalize──► open ──pay──► paid
  │                  │  ▲
  │                  │  └─────pay──── uncollectible ◄──mark_uncollectible── open
  └──void──► void ◄──┴──void── (draft, open, uncollectible)
```

`open` means finalized: numbered from the deployment's gapless sequence and immutable. `paid`
and `void` are final. Finalizing takes the number last, after the event is written (which it
then numbers too), so other finalizers wait on the sequence only until this one commits.
A transition locks the invoice row first (`SELECT … FOR UPDATE` on PostgreSQL), so of two
racing callers one changes the invoice and the other finds it changed: asking for the state
an invoice is already in changes nothing and publishes nothing; asking for a transition its
state forbids raises `InvoiceStateError`. The event is written to the outbox
in the caller's transaction, with an id derived from the invoice and the transition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

import webhooks
from billing.errors import InvoiceStateError, UnknownInvoiceError
from billing.late_usage import DEFAULT_LOOKBACK, LateUsage
from billing.models import Invoice
from billing.numbering import number_invoice
from billing.tenants import tenant_zone
from webhooks.interfaces import NewEvent
from webhooks.service import new_event
from webhooks.sqltypes import utcnow

INVOICE_CREATED = "billing.invoice.created"
INVOICE_FINALIZED = "billing.invoice.finalized"
INVOICE_PAID = "billing.invoice.paid"
INVOICE_VOIDED = "billing.invoice.voided"
INVOICE_MARKED_UNCOLLECTIBLE = "billing.invoice.marked_uncollectible"


class Outbox(Protocol):
    """Where billing publishes its events: the `webhooks` module itself, or anything alike.

    It must store them in `webhook_events`, in the caller's transaction: finalizing publishes
    `billing.invoice.finalized` before the number is taken, and the numbering statement then
    writes the number into that stored event (`billing.numbering.number_invoice`). The
    `webhooks` module itself (the SQL outbox) is not called for the invoice's created and
    finalized events: the statements that store the invoice and number it store them.
    """

    def publish(
        self,
        session: Session,
        topic: str,
        payload: Mapping[str, Any],
        *,
        event_id: str | None = None,
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class InvoicePolicy:
    """How a deployment issues invoices (`INVOICE_NUMBER_PREFIX`, `INVOICE_GRACE_PERIOD`) and
    bills late usage (`LATE_USAGE`, `LATE_USAGE_LOOKBACK`: see `billing.late_usage`)."""

    number_prefix: str = "INV-"
    grace_period: timedelta = timedelta(0)
    late_usage: LateUsage = "next_invoice"
    late_usage_lookback: timedelta = DEFAULT_LOOKBACK

    @property
    def late_fanout_lookback(self) -> timedelta | None:
        """How far back the invoice fan-out looks for tenants with late usage to bill: the
        lookback, or None under `LATE_USAGE=ignore` (nothing to bill)."""
        return None if self.late_usage == "ignore" else self.late_usage_lookback


DEFAULT_POLICY = InvoicePolicy()


@dataclass(frozen=True, slots=True)
class Transition:
    sources: frozenset[str]
    target: str
    topic: str
    event_name: str


FINALIZE = Transition(frozenset({"draft"}), "open", INVOICE_FINALIZED, "finalized")
PAY = Transition(frozenset({"open", "uncollectible"}), "paid", INVOICE_PAID, "paid")
MARK_UNCOLLECTIBLE = Transition(
    frozenset({"open"}), "uncollectible", INVOICE_MARKED_UNCOLLECTIBLE, "marked_uncollectible"
)
VOID = Transition(frozenset({"draft", "open", "uncollectible"}), "void", INVOICE_VOIDED, "voided")


def own_invoice(session: Session, tenant_id: str, invoice_id: str, *, lock: bool) -> Invoice:
    """The tenant's invoice, read afresh; with `lock`, its row locked until the transaction ends.

    Raises:
        UnknownInvoiceError: no invoice of this tenant has that id.
    """
    query = select(Invoice).where(Invoice.id == invoice_id, Invoice.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    invoice = session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()
    if invoice is None:
        raise UnknownInvoiceError(f"no invoice {invoice_id!r} for this tenant")
    return invoice


def apply(
    session: Session,
    invoice: Invoice,
    transition: Transition,
    *,
    now: Callable[[], datetime],
    policy: InvoicePolicy,
    outbox: Outbox,
    zone: tzinfo | None = None,
    commit: bool = False,
) -> bool:
    """Move a locked invoice through `transition`; return False if it was already there.
    The event shows the period in `zone`, the tenant's (read when not given). Finalizing, the
    last statement writes the status and takes the invoice's number in one UPDATE of its row
    (`billing.numbering.number_invoice`): commit soon after, as every other finalizer waits
    for it; with `commit` that statement commits the session's transaction (on PostgreSQL).

    Raises:
        InvoiceStateError: the invoice's status does not allow the transition.
    """
    if invoice.status == transition.target:
        return False
    if invoice.status not in transition.sources:
        raise InvoiceStateError(
            f"a {invoice.status} invoice cannot become {transition.target}",
            invoice_id=invoice.id,
            status=invoice.status,
        )
    moment = now()
    if transition is FINALIZE:  # the row is written with its number, last (below)
        set_committed_value(invoice, "finalized_at", moment)
        set_committed_value(invoice, "status", transition.target)
    else:
        if transition is PAY:
            invoice.paid_at = moment
        elif transition is VOID:
            invoice.voided_at = moment
        invoice.status = transition.target
        session.flush()
    event_id = f"invoice_{transition.event_name}_{invoice.id}"
    payload = state_event(invoice, zone or tenant_zone(session, invoice.tenant_id))
    # Finalizing with the SQL outbox, the numbering statement stores the event too.
    announce = transition is FINALIZE and outbox is webhooks
    if not announce:
        outbox.publish(session, transition.topic, payload, event_id=event_id)
    if transition is FINALIZE:  # last: the sequence stays locked from here to the commit
        event = new_event(transition.topic, payload, event_id, utcnow()) if announce else None
        number = number_invoice(
            session,
            invoice.id,
            event_id,
            policy.number_prefix,
            finalized_at=moment,
            event=event,
            commit=commit,
        )
        set_committed_value(invoice, "number", number)
    return True


def state_event(invoice: Invoice, zone: tzinfo = UTC) -> dict[str, Any]:
    """The payload of `billing.invoice.finalized` / `.paid` / `.voided`; the period is shown
    with the offset of the tenant's `zone`."""
    return {
        "tenant_id": invoice.tenant_id,
        "invoice_id": invoice.id,
        "number": invoice.number,
        "status": invoice.status,
        "period_start": invoice.period_start.astimezone(zone).isoformat(),
        "period_end": invoice.period_end.astimezone(zone).isoformat(),
        "currency": invoice.currency,
        "total_amount": invoice.total_amount,
    }


def created_event(
    *,
    tenant_id: str,
    invoice_id: str,
    period_start: datetime,
    period_end: datetime,
    currency: str,
) -> NewEvent:
    """`billing.invoice.created` (the seed's payload), with its stable id: once per invoice
    row."""
    payload = {
        "tenant_id": tenant_id,
        "invoice_id": invoice_id,
        "period_start": period_start.isoformat(),
        "period_end": period_end.isoformat(),
        "currency": currency,
    }
    return new_event(INVOICE_CREATED, payload, created_event_id(invoice_id), utcnow())


def created_event_id(invoice_id: str) -> str:
    """The stable id of the `billing.invoice.created` event of an invoice."""
    return f"invoice_created_{invoice_id}"
