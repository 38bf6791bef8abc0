"""Mirror our invoices to Stripe through its HTTP API (usable as `provider_sync`).

For one of our invoices it makes these calls, each write with an `Idempotency-Key` derived
from our ids, so a sync retried after a timeout or a crash replays Stripe's first answers
instead of creating a second invoice:

1. `GET /v1/invoices/search` for an invoice whose metadata carries our invoice id: Stripe keeps
   idempotency keys for 24 hours only, so a sync retried later (the scheduler's sweep) finds the
   invoice an earlier attempt made instead of making another;
2. `POST /v1/invoices` — unless found: a draft for the tenant's Stripe customer, our invoice id
   in metadata, `pending_invoice_items_behavior=exclude` so unrelated pending items stay out;
3. `POST /v1/invoiceitems` — one per line with a non-zero amount, in minor units, on that draft
   (lines already on a found draft, by `metadata[billing_line_id]`, are not added again);
4. `POST /v1/invoices/{id}/finalize` — while it is still a draft.

It also follows the invoice's later life (the optional `pay` / `void` of a `provider_sync`):
`pay` marks the Stripe invoice paid out of band (`POST /v1/invoices/{id}/pay` with
`paid_out_of_band=true`), `void` voids it (`POST /v1/invoices/{id}/void`); each first reads the
Stripe invoice and does nothing when it is already in that state.

The tenant → customer mapping is the app's (`customer_for_tenant`). Stripe's search is
eventually consistent (about a minute): the idempotency keys cover that window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from billing.dimensions import describe
from billing.models import Invoice, InvoiceLine

STRIPE_API = "https://api.stripe.com"


class StripeError(RuntimeError):
    """Stripe answered with an error (4xx/5xx) or could not be reached."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class StripeInvoiceSync:
    """A `provider_sync` that creates the invoice in Stripe and returns Stripe's invoice id."""

    def __init__(
        self,
        *,
        api_key: str,
        customer_for_tenant: Callable[[str], str],
        client: httpx.Client | None = None,
        base_url: str = STRIPE_API,
        timeout: httpx.Timeout | None = None,
    ) -> None:
        self.customer_for_tenant = customer_for_tenant
        self.client = client or httpx.Client(
            base_url=base_url, timeout=timeout or httpx.Timeout(30.0, connect=5.0)
        )
        self.api_key = api_key

    def __call__(self, invoice: Invoice, lines: list[InvoiceLine]) -> str:
        customer = self.customer_for_tenant(invoice.tenant_id)
        draft = self._find(invoice) or self._create(invoice, customer)
        stripe_invoice_id = str(draft["id"])
        if draft.get("status", "draft") != "draft":
            return stripe_invoice_id  # finalized by an earlier attempt
        attached = self._attached_lines(stripe_invoice_id)
        for line in lines:
            if line.amount == 0 or line.id in attached:
                continue
            self._post(
                "/v1/invoiceitems",
                {
                    "customer": customer,
                    "invoice": stripe_invoice_id,
                    "amount": str(line.amount),
                    "currency": invoice.currency,
                    "description": _describe(line),
                    "metadata[billing_invoice_id]": invoice.id,
                    "metadata[billing_line_id]": line.id,
                },
                idempotency_key=f"billing-line-{line.id}",
            )
        self._post(
            f"/v1/invoices/{stripe_invoice_id}/finalize",
            {},
            idempotency_key=f"billing-finalize-{invoice.id}",
        )
        return stripe_invoice_id

    def pay(self, invoice: Invoice) -> None:
        """Mark the Stripe invoice of `invoice` paid out of band (it was paid here)."""
        self._move(invoice, "paid", "pay", {"paid_out_of_band": "true"})

    def void(self, invoice: Invoice) -> None:
        """Void the Stripe invoice of `invoice`."""
        self._move(invoice, "void", "void", {})

    def _move(self, invoice: Invoice, status: str, action: str, form: dict[str, str]) -> None:
        stripe_invoice_id = invoice.provider_invoice_id
        if not stripe_invoice_id:
            raise StripeError(f"invoice {invoice.id} was never sent to Stripe")
        current = self._get(f"/v1/invoices/{stripe_invoice_id}", {})
        if current.get("status") == status:
            return
        self._post(
            f"/v1/invoices/{stripe_invoice_id}/{action}",
            form,
            idempotency_key=f"billing-{action}-{invoice.id}",
        )

    def _find(self, invoice: Invoice) -> dict[str, Any] | None:
        found = self._get(
            "/v1/invoices/search",
            {"query": f"metadata['billing_invoice_id']:'{invoice.id}'", "limit": "1"},
        )
        data = found.get("data") or []
        return dict(data[0]) if data else None

    def _create(self, invoice: Invoice, customer: str) -> dict[str, Any]:
        return self._post(
            "/v1/invoices",
            {
                "customer": customer,
                "currency": invoice.currency,
                "collection_method": "charge_automatically",
                "auto_advance": "true",
                "pending_invoice_items_behavior": "exclude",
                "metadata[billing_invoice_id]": invoice.id,
                "metadata[billing_tenant_id]": invoice.tenant_id,
                "metadata[period_start]": invoice.period_start.isoformat(),
                "metadata[period_end]": invoice.period_end.isoformat(),
            },
            idempotency_key=f"billing-invoice-{invoice.id}",
        )

    def _attached_lines(self, stripe_invoice_id: str) -> set[str]:
        items = self._get("/v1/invoiceitems", {"invoice": stripe_invoice_id, "limit": "100"})
        return {
            str(item["metadata"]["billing_line_id"])
            for item in items.get("data") or []
            if (item.get("metadata") or {}).get("billing_line_id")
        }

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        return self._send("GET", path, params=params)

    def _post(self, path: str, form: dict[str, str], *, idempotency_key: str) -> dict[str, Any]:
        return self._send("POST", path, data=form, idempotency_key=idempotency_key)

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            response = self.client.request(method, path, params=params, data=data, headers=headers)
        except httpx.HTTPError as error:
            raise StripeError(f"Stripe unreachable on {path}: {error}") from error
        if response.status_code >= 400:
            raise StripeError(
                f"Stripe answered {response.status_code} on {path}: {response.text[:500]}",
                status_code=response.status_code,
            )
        body: dict[str, Any] = response.json()
        return body


def _describe(line: InvoiceLine) -> str:
    if line.metric is None:
        return "Subscription fee"
    return f"{describe(line.metric, line.dimensions)}: {line.quantity:,} units"
