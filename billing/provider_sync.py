"""Mirroring invoices to a payment provider through the `provider_sync` hook.

The hook is a plain or `async` callable `(invoice, lines)` that creates a finalized invoice at
the provider and may return the provider's id for it. A hook may also follow the invoice's
later life, an optional capability told by its methods, plain or `async`:

- `pay(invoice)`: the invoice was paid (here, so out of band for the provider);
- `void(invoice)`: the invoice was voided.

`invoices.provider_status` says how far the provider was brought (`open` once sent, then
`paid` or `void`), so each call is made once per invoice; a call that fails changes nothing
here and is made again by the next sync (the hook's own idempotency, as for the first call,
covers a crash between its answer and our commit). A hook without a method is simply not told.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import metrics
from billing.errors import ProviderSyncError
from billing.models import Invoice, InvoiceLine

STATUS_CALLS = {"paid": "pay", "void": "void"}
"""The hook's method that reports each status, when it has it."""


class ProviderSync(Protocol):
    """Mirrors an invoice to a payment provider; may return the provider's invoice id.

    A plain or an `async` callable; an awaitable result is awaited. Optionally also has
    `pay(invoice)` and `void(invoice)` methods (see the module).
    """

    def __call__(
        self, invoice: Invoice, lines: list[InvoiceLine]
    ) -> str | None | Awaitable[str | None]: ...


def sync_to_provider(session: Session, invoice: Invoice, hook: ProviderSync) -> str | None:
    """Bring the provider in line with `invoice`; return its provider id.

    A draft is not sent (it may still change), nor is a void invoice that never was. An invoice
    not sent yet is sent; then a paid or void one is reported once, by `pay` / `void`.

    Raises:
        ProviderSyncError: the hook raised; what reached the provider before is kept.
    """
    if invoice.status == "draft":
        return invoice.provider_invoice_id
    if invoice.provider_invoice_id is None:
        if invoice.status == "void":
            return None
        _send(session, invoice, hook)
    if invoice.provider_invoice_id is not None:
        _report_status(invoice, hook)
    session.flush()
    return invoice.provider_invoice_id


def _send(session: Session, invoice: Invoice, hook: ProviderSync) -> None:
    lines = list(
        session.execute(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_id == invoice.id)
            .order_by(InvoiceLine.created_at, InvoiceLine.id)
        ).scalars()
    )
    provider_id = _call(invoice, lambda: hook(invoice, lines))
    if isinstance(provider_id, str) and provider_id:
        invoice.provider_invoice_id = provider_id
        invoice.provider_status = "open"


def _report_status(invoice: Invoice, hook: ProviderSync) -> None:
    name = STATUS_CALLS.get(invoice.status)
    if name is None or invoice.provider_status == invoice.status:
        return
    method = getattr(hook, name, None)
    if callable(method):
        _call(invoice, lambda: method(invoice))
    invoice.provider_status = invoice.status


def _call(invoice: Invoice, call: Callable[[], Any]) -> Any:
    try:
        return _resolve(call())
    except Exception as error:
        metrics.PROVIDER_SYNC_FAILURES.inc()
        raise ProviderSyncError(
            f"provider sync failed for invoice {invoice.id}: {error}", invoice_id=invoice.id
        ) from error


def _resolve(result: Any) -> Any:
    """Await an awaitable result, also when called from inside a running event loop."""
    if not inspect.isawaitable(result):
        return result
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(result))
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(_await(result))
        except BaseException as error:  # re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=run, name="provider-sync")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
