"""Mirror our invoices to Stripe through its HTTP API (usable as `provider_sync`).

For one of our invoices it makes three kinds of calls, each with an `Idempotency-Key` derived
from our ids, so a sync retried after a timeout or a crash replays Stripe's first answers
instead of creating a second invoice:

1. `POST /v1/invoices` — a draft for the tenant's Stripe customer, our invoice id in metadata,
   `pending_invoice_items_behavior=exclude` so unrelated pending items stay out;
2. `POST /v1/invoiceitems` — one per line with a non-zero amount, in minor units, on that draft;
3. `POST /v1/invoices/{id}/finalize`.

The tenant → customer mapping is the app's (`customer_for_tenant`). Stripe keeps idempotency
keys for 24 hours: within that window any retry is safe, which Dramatiq's bounded retries of
`billing.sync_invoice` stay inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

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
        draft = self._post(
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
        stripe_invoice_id = str(draft["id"])
        for line in lines:
            if line.amount == 0:
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

    def _post(self, path: str, form: dict[str, str], *, idempotency_key: str) -> dict[str, Any]:
        try:
            response = self.client.post(
                path,
                data=form,
                headers={
                    "Authorization": f"Bearer {self.api_key}",
                    "Idempotency-Key": idempotency_key,
                },
            )
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
    return f"{line.metric}: {line.quantity:,} units"
