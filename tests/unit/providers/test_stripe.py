"""The Stripe mapper against a fake Stripe that checks what Stripe documents."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import httpx
import pytest

from billing import BillingService, ProviderSyncError
from billing.models import Invoice, Plan, Price, Subscription
from billing.providers import StripeError, StripeInvoiceSync

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


class FakeStripe:
    """Enough of Stripe: form bodies, bearer auth, idempotency keys replaying the first answer."""

    def __init__(self) -> None:
        self.invoices: dict[str, dict] = {}
        self.items: list[dict] = []
        self.replies: dict[str, httpx.Response] = {}
        self.fail_next: list[int] = []
        self.ids = itertools.count(1)
        self.requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        assert request.headers["Authorization"] == "Bearer sk_test_123"
        if request.method == "GET":
            return self.read(request.url.path, dict(request.url.params))
        if request.content:
            assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        key = request.headers["Idempotency-Key"]
        if key in self.replies:
            return self.replies[key]
        if self.fail_next:
            return httpx.Response(self.fail_next.pop(), json={"error": {"type": "api_error"}})
        form = dict(parse_qsl(request.content.decode()))
        reply = self.handle(request.url.path, form)
        self.replies[key] = reply
        return reply

    def read(self, path: str, params: dict[str, str]) -> httpx.Response:
        if path == "/v1/invoices/search":
            wanted = params["query"].split(":", 1)[1].strip("'")
            found = [
                i for i in self.invoices.values() if i["metadata[billing_invoice_id]"] == wanted
            ]
            return httpx.Response(200, json={"object": "search_result", "data": found})
        if path == "/v1/invoiceitems":
            found = [
                {"id": i["id"], "metadata": {"billing_line_id": i["metadata[billing_line_id]"]}}
                for i in self.items
                if i["invoice"] == params["invoice"]
            ]
            return httpx.Response(200, json={"object": "list", "data": found})
        if path.startswith("/v1/invoices/") and path.split("/")[3] in self.invoices:
            return httpx.Response(200, json=self.invoices[path.split("/")[3]])
        return httpx.Response(404, json={"error": {"type": "invalid_request_error"}})

    def forget_idempotency_keys(self) -> None:
        """What Stripe does after 24 hours."""
        self.replies.clear()

    def handle(self, path: str, form: dict[str, str]) -> httpx.Response:
        if path == "/v1/invoices":
            assert form["customer"].startswith("cus_")
            invoice = {"id": f"in_{next(self.ids)}", "status": "draft", **form}
            self.invoices[invoice["id"]] = invoice
            return httpx.Response(200, json=invoice)
        if path == "/v1/invoiceitems":
            assert form["invoice"] in self.invoices
            assert form["amount"].isdigit()  # minor units, an integer
            item = {"id": f"ii_{next(self.ids)}", **form}
            self.items.append(item)
            return httpx.Response(200, json=item)
        if path.startswith("/v1/invoices/") and path.endswith("/finalize"):
            invoice = self.invoices[path.split("/")[3]]
            invoice["status"] = "open"
            return httpx.Response(200, json=invoice)
        if path.startswith("/v1/invoices/") and path.endswith(("/pay", "/void")):
            invoice = self.invoices[path.split("/")[3]]
            if invoice["status"] not in ("open", "uncollectible"):  # Stripe's rule
                return httpx.Response(400, json={"error": {"type": "invalid_request_error"}})
            paying = path.endswith("/pay")
            assert form == ({"paid_out_of_band": "true"} if paying else {})
            invoice["status"] = "paid" if paying else "void"
            return httpx.Response(200, json=invoice)
        return httpx.Response(404, json={"error": {"type": "invalid_request_error"}})


@pytest.fixture
def stripe() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
def sync(stripe: FakeStripe) -> StripeInvoiceSync:
    client = httpx.Client(base_url="https://api.stripe.test", transport=httpx.MockTransport(stripe))
    return StripeInvoiceSync(
        api_key="sk_test_123", customer_for_tenant=lambda t: f"cus_{t}", client=client
    )


@pytest.fixture
def tenant_with_usage(session) -> None:
    plan = Plan(key="pro", name="Pro")
    session.add(plan)
    session.flush()
    session.add_all(
        [
            Price(
                key="fee",
                plan_id=plan.id,
                currency="usd",
                unit_amount=2900,
                recurring_interval="month",
            ),
            Price(key="tok", plan_id=plan.id, currency="usd", metric="tokens", unit_amount=2),
            Subscription(tenant_id="t1", plan_id=plan.id, effective_at=JAN),
        ]
    )
    bs = BillingService(session=session, tenant_id="t1")
    bs.record_usage(metric="tokens", amount=50, at=JAN, idempotency_key="a")
    bs.record_usage(metric="calls", amount=9, at=JAN, idempotency_key="b")  # unpriced: amount 0


def invoice(session, sync) -> Invoice:
    bs = BillingService(session=session, tenant_id="t1", provider_sync=sync)
    return session.get(
        Invoice, bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    )


@pytest.mark.usefixtures("tenant_with_usage")
def test_an_invoice_becomes_one_finalized_stripe_invoice_with_its_lines(session, sync, stripe):
    ours = invoice(session, sync)
    (stripe_invoice,) = stripe.invoices.values()
    assert ours.provider_invoice_id == stripe_invoice["id"]
    assert stripe_invoice["status"] == "open"
    assert stripe_invoice["customer"] == "cus_t1"
    assert stripe_invoice["metadata[billing_invoice_id]"] == ours.id
    assert stripe_invoice["pending_invoice_items_behavior"] == "exclude"
    assert sorted((i["amount"], i["currency"]) for i in stripe.items) == [
        ("100", "usd"),
        ("2900", "usd"),
    ]
    assert all(i["invoice"] == stripe_invoice["id"] for i in stripe.items)


@pytest.mark.usefixtures("tenant_with_usage")
def test_a_sync_retried_after_a_stripe_outage_makes_no_second_invoice(session, sync, stripe):
    stripe.fail_next = [500]  # the first call fails: the invoice stays, unsynced
    bs = BillingService(session=session, tenant_id="t1", provider_sync=sync)
    with pytest.raises(ProviderSyncError) as caught:
        bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    assert isinstance(caught.value.__cause__, StripeError)
    assert session.get(Invoice, caught.value.invoice_id).provider_invoice_id is None
    bs.sync_invoice(caught.value.invoice_id)
    bs.sync_invoice(caught.value.invoice_id)  # already synced: no call at all
    assert len(stripe.invoices) == 1
    assert len(stripe.items) == 2


@pytest.mark.usefixtures("tenant_with_usage")
def test_a_sync_that_died_midway_replays_and_adds_no_duplicate_items(session, sync, stripe):
    ours = invoice(session, None)
    lines = list(ours.lines)
    sync(ours, lines)  # Stripe has it all, but our process died before storing the id
    assert sync(ours, lines) == next(iter(stripe.invoices))
    assert len(stripe.invoices) == 1
    assert len(stripe.items) == 2


@pytest.mark.usefixtures("tenant_with_usage")
def test_a_sync_retried_after_stripe_forgot_its_keys_finds_the_first_invoice(session, sync, stripe):
    ours = invoice(session, None)
    lines = list(ours.lines)
    original = stripe.handle
    posted: list[str] = []

    def dies_on_the_second_item(path, form):
        if path == "/v1/invoiceitems" and path in posted:
            raise httpx.ConnectError("connection reset")
        posted.append(path)
        return original(path, form)

    stripe.handle = dies_on_the_second_item
    with pytest.raises(StripeError):
        sync(ours, lines)  # the draft and one item exist in Stripe ...
    stripe.handle = original
    stripe.forget_idempotency_keys()  # ... and is retried a day later
    stripe_id = sync(ours, lines)
    assert list(stripe.invoices) == [stripe_id]
    assert stripe.invoices[stripe_id]["status"] == "open"
    assert sorted(i["amount"] for i in stripe.items) == ["100", "2900"]


@pytest.mark.usefixtures("tenant_with_usage")
def test_a_finalized_invoice_found_by_search_is_not_touched_again(session, sync, stripe):
    ours = invoice(session, None)
    first = sync(ours, list(ours.lines))
    stripe.forget_idempotency_keys()
    before = stripe.requests
    assert sync(ours, list(ours.lines)) == first
    assert stripe.requests == before + 1  # the search only
    assert len(stripe.items) == 2


@pytest.mark.usefixtures("tenant_with_usage")
@pytest.mark.parametrize(("change", "status"), [("pay_invoice", "paid"), ("void_invoice", "void")])
def test_paying_or_voiding_moves_the_stripe_invoice_once(session, sync, stripe, change, status):
    ours = invoice(session, sync)
    bs = BillingService(session=session, tenant_id="t1", provider_sync=sync)
    getattr(bs, change)(ours.id)
    assert stripe.invoices[ours.provider_invoice_id]["status"] == status
    before = stripe.requests
    getattr(bs, change)(ours.id)
    bs.sync_invoice(ours.id)
    assert stripe.requests == before  # told once: no more calls


@pytest.mark.usefixtures("tenant_with_usage")
def test_a_payment_retried_after_stripe_forgot_its_keys_is_not_posted_again(
    session, sync, stripe
) -> None:
    ours = invoice(session, sync)
    ours.status = "paid"
    sync.pay(ours)
    stripe.forget_idempotency_keys()
    before = stripe.requests
    sync.pay(ours)  # Stripe says paid already: only the read
    assert stripe.requests == before + 1
    assert stripe.invoices[ours.provider_invoice_id]["status"] == "paid"


def test_an_invoice_never_sent_cannot_be_paid_in_stripe(sync, stripe) -> None:
    with pytest.raises(StripeError, match="never sent"):
        sync.void(Invoice(id="x", provider_invoice_id=None))
    assert stripe.requests == 0
