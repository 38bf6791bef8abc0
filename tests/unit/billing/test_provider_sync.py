"""Provider sync follows the invoice: sent once finalized, then told of a payment or a void once,
when the hook has `pay` / `void`; inline with `provider_sync`, or by `billing.sync_invoice` and
the sweep for changes made elsewhere (HTTP, commands). On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from billing import BillingService, InvoicePolicy, ProviderSyncError
from billing.models import Invoice
from tests.unit.billing.test_lifecycle import FEB, JAN, LATER
from tests.unit.billing.test_lifecycle import plan as plan
from workers.fanout import unsynced_invoices_query
from workers.jobs import sync_invoice_job


class Provider:
    """A provider hook with the optional capability, recording what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.failing: set[str] = set()

    def __call__(self, invoice: Invoice, lines: list) -> str:
        return self._record("send", invoice, len(lines))

    def pay(self, invoice: Invoice) -> None:
        self._record("pay", invoice, invoice.provider_invoice_id)

    async def void(self, invoice: Invoice) -> None:  # async hooks are awaited
        self._record("void", invoice, invoice.provider_invoice_id)

    def _record(self, what: str, invoice: Invoice, detail: object) -> str:
        if what in self.failing:
            raise ConnectionError(f"{what} failed")
        self.calls.append((what, invoice.status, str(detail)))
        return f"prov_{invoice.number}"


@pytest.fixture
def provider() -> Provider:
    return Provider()


def service(session: Session, hook=None, **policy) -> BillingService:
    return BillingService(
        session=session,
        tenant_id="t1",
        provider_sync=hook,
        now=lambda: LATER,
        policy=InvoicePolicy(**policy),
    )


def generate(session, hook=None, **policy) -> str:
    return service(session, hook, **policy).generate_monthly_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )


def test_paying_reaches_the_provider_once(session, plan, provider) -> None:
    invoice_id = generate(session, provider)
    bs = service(session, provider)
    bs.pay_invoice(invoice_id)
    bs.pay_invoice(invoice_id)  # paid already: nothing more
    bs.sync_invoice(invoice_id)
    assert provider.calls == [("send", "open", "2"), ("pay", "paid", "prov_INV-000001")]
    assert session.get(Invoice, invoice_id).provider_status == "paid"


def test_voiding_reaches_the_provider_once_and_an_async_method_is_awaited(
    session, plan, provider
) -> None:
    invoice_id = generate(session, provider)
    bs = service(session, provider)
    bs.void_invoice(invoice_id)
    bs.void_invoice(invoice_id)
    assert provider.calls == [("send", "open", "2"), ("void", "void", "prov_INV-000001")]


def test_an_invoice_paid_before_it_was_sent_is_sent_then_paid(session, plan, provider) -> None:
    invoice_id = generate(session)
    service(session).pay_invoice(invoice_id)
    assert service(session, provider).sync_invoice(invoice_id) == "prov_INV-000001"
    assert provider.calls == [("send", "paid", "2"), ("pay", "paid", "prov_INV-000001")]


def test_a_void_invoice_never_sent_and_a_draft_are_not_sent(session, plan, provider) -> None:
    draft = generate(session, provider, grace_period=timedelta(days=3))
    assert service(session, provider).sync_invoice(draft) is None
    service(session, provider).void_invoice(draft)
    assert service(session, provider).sync_invoice(draft) is None
    assert provider.calls == []


def test_a_hook_without_the_capability_is_only_sent_the_invoice(session, plan) -> None:
    sent: list[str] = []

    def plain(invoice, lines) -> str:
        sent.append(invoice.status)
        return "prov_1"

    invoice_id = generate(session, plain)
    service(session, plain).pay_invoice(invoice_id)
    assert sent == ["open"]
    assert session.get(Invoice, invoice_id).provider_status == "paid"


def test_a_failed_report_is_an_error_and_is_made_by_the_next_sync(session, plan, provider) -> None:
    invoice_id = generate(session, provider)
    provider.failing = {"pay"}
    with pytest.raises(ProviderSyncError) as caught:
        service(session, provider).pay_invoice(invoice_id)
    assert caught.value.invoice_id == invoice_id
    assert session.get(Invoice, invoice_id).provider_status == "open"
    provider.failing = set()
    service(session, provider).sync_invoice(invoice_id)
    assert [call[0] for call in provider.calls] == ["send", "pay"]


def test_a_payment_made_without_the_hook_is_swept_and_synced_by_the_job(
    session_factory, provider
) -> None:
    from tests.unit.billing.test_lifecycle import seed_plan

    with session_factory.begin() as session:
        seed_plan(session)
        invoice_id = generate(session, provider)
    with session_factory.begin() as session:
        service(session).pay_invoice(invoice_id)  # as over HTTP: no hook in this process
        paid_at = session.get(Invoice, invoice_id).paid_at
    window = (paid_at - timedelta(hours=1), paid_at + timedelta(hours=1))
    with session_factory() as session:
        assert session.execute(unsynced_invoices_query(*window)).all() == [(invoice_id, "t1")]
        assert (
            session.execute(unsynced_invoices_query(paid_at + timedelta(seconds=1), LATER)).all()
            == []
        )
    sync_invoice_job(session_factory, {"invoice_id": invoice_id}, provider_sync=provider)
    sync_invoice_job(session_factory, {"invoice_id": invoice_id}, provider_sync=provider)
    assert [call[0] for call in provider.calls] == ["send", "pay"]
    with session_factory() as session:
        assert session.execute(unsynced_invoices_query(*window)).all() == []
