"""`billing.sync_invoice`: after the invoice commits, retried through provider outages, once.

The actors run on a StubBroker with a real Worker; the Stripe mapper talks to the fake Stripe of
tests/unit/providers/test_stripe.py over `httpx.MockTransport`.
"""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from dramatiq import Middleware
from sqlalchemy import create_engine, func, select

from billing.models import Invoice
from billing.providers import StripeInvoiceSync
from workers import actors
from workers.broker import QUEUE_NAME
from workers.errors import InvoiceNotFoundError, ProviderSyncNotConfiguredError
from workers.jobs import (
    INVOICE_CREATED,
    SYNC_INVOICE,
    generate_monthly_invoice_job,
    make_billing_job_handler,
    sync_invoice_job,
)

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
JOIN_MS = 10_000
INVOICE_JAN = {
    "tenant_id": "t1",
    "period_start": JAN.isoformat(),
    "period_end": FEB.isoformat(),
    "currency": "usd",
}


def _fake_stripe_class():
    """The FakeStripe of the Stripe mapper's tests, loaded from its file (no test packages)."""
    path = Path(__file__).resolve().parents[1] / "providers" / "test_stripe.py"
    spec = importlib.util.spec_from_file_location("_stripe_fakes", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeStripe


class FlakyProvider:
    """Fails its first `failures` calls like a provider outage, then returns `prov_<id>`.

    At every call it notes whether the invoice was already committed (read through a separate
    connection): the provider must only ever see invoices that exist for good.
    """

    def __init__(self, failures: int, committed) -> None:
        self.failures = failures
        self.committed = committed
        self.calls: list[str] = []
        self.seen_committed: list[bool] = []

    def __call__(self, invoice, lines) -> str:
        self.calls.append(invoice.id)
        self.seen_committed.append(self.committed(invoice.id))
        if len(self.calls) <= self.failures:
            raise ConnectionError("provider unreachable")
        return f"prov_{invoice.id}"


@pytest.fixture
def committed(engine):
    """`committed(invoice_id)`: is that invoice visible to another connection?"""
    reader = create_engine(engine.url)  # plain engine: its reads take no write lock on SQLite

    def check(invoice_id: str) -> bool:
        with reader.connect() as conn:
            query = select(func.count()).select_from(Invoice).where(Invoice.id == invoice_id)
            return conn.execute(query).scalar_one() == 1

    yield check
    reader.dispose()


def invoices(session_factory) -> list[Invoice]:
    with session_factory() as session:
        return list(session.scalars(select(Invoice)))


def run(stub_broker, stub_worker) -> None:
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS, fail_fast=False)
    stub_worker.join()


def test_a_sync_failing_twice_then_succeeding_stores_one_provider_id_after_the_commit(
    stub_broker, stub_worker, bound, seeded, outbox, committed
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    provider = FlakyProvider(failures=2, committed=committed)
    actors.bind(bound, provider_sync=provider)
    actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    run(stub_broker, stub_worker)
    [invoice] = invoices(bound)
    assert provider.calls == [invoice.id] * 3
    assert provider.seen_committed == [True, True, True]  # created before the provider answered
    assert invoice.provider_invoice_id == f"prov_{invoice.id}"
    assert len(outbox(INVOICE_CREATED)) == 1
    assert stub_broker.dead_letters == []
    actors.enqueue_sync_invoice(invoice_id=invoice.id)  # a duplicate sync: no second call
    run(stub_broker, stub_worker)
    assert len(provider.calls) == 3


def test_a_provider_outage_never_blocks_invoicing_and_dead_letters_only_the_sync(
    stub_broker, stub_worker, bound, seeded, outbox, committed, worker_settings
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    provider = FlakyProvider(failures=100, committed=committed)
    actors.bind(bound, provider_sync=provider)
    actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    run(stub_broker, stub_worker)
    [invoice] = invoices(bound)
    assert invoice.provider_invoice_id is None
    assert len(outbox(INVOICE_CREATED)) == 1
    assert len(provider.calls) == 1 + worker_settings.sync_max_retries
    [dead] = stub_broker.dead_letters
    assert (dead.actor_name, dead.args) == (SYNC_INVOICE, ({"invoice_id": invoice.id},))


def test_without_a_provider_the_invoice_job_sends_no_sync(
    stub_broker, stub_worker, bound, seeded
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    sent = []
    stub_broker.add_middleware(_Recorder(sent))
    actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    run(stub_broker, stub_worker)
    assert sent == ["billing.generate_monthly_invoice"]
    assert len(invoices(bound)) == 1


class _Recorder(Middleware):
    """Notes the actor of every message enqueued."""

    def __init__(self, sent: list[str]) -> None:
        self.sent = sent

    def before_enqueue(self, broker, message, delay) -> None:
        self.sent.append(message.actor_name)


def test_a_failed_enqueue_after_the_commit_retries_the_invoice_job_and_the_sync_happens(
    stub_broker, stub_worker, bound, seeded, outbox, committed, monkeypatch
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    provider = FlakyProvider(failures=0, committed=committed)
    actors.bind(bound, provider_sync=provider)
    real_enqueue = actors._enqueue_sync
    attempts = []

    def broker_blip(invoice_id: str) -> None:
        attempts.append(invoice_id)
        if len(attempts) == 1:
            raise redis.ConnectionError("Redis restarting")
        real_enqueue(invoice_id)

    monkeypatch.setattr(actors, "_enqueue_sync", broker_blip)
    actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    run(stub_broker, stub_worker)
    [invoice] = invoices(bound)
    assert len(attempts) == 2  # the invoice job ran again, found its invoice, sent the sync
    assert invoice.provider_invoice_id == f"prov_{invoice.id}"
    assert provider.calls == [invoice.id]
    assert len(outbox(INVOICE_CREATED)) == 1


def test_an_invoice_reaches_stripe_exactly_once_through_lost_answers_and_a_crash(
    stub_broker, stub_worker, bound, seeded, committed
) -> None:
    stripe = _fake_stripe_class()()
    stripe.fail_next = [503]  # the first call meets an outage
    requests = []

    def lossy(request: httpx.Request) -> httpx.Response:
        """Stripe does the work, but the answer to the 2nd request is lost on the way back."""
        response = stripe(request)
        requests.append(request.url.path)
        if len(requests) == 2:
            raise httpx.ReadTimeout("answer lost", request=request)
        return response

    client = httpx.Client(base_url="https://api.stripe.test", transport=httpx.MockTransport(lossy))
    mapper = StripeInvoiceSync(
        api_key="sk_test_123", customer_for_tenant=lambda t: f"cus_{t}", client=client
    )
    crashed = []

    def crash_once_after_stripe(invoice, lines):
        stripe_id = mapper(invoice, lines)
        if not crashed:  # the worker dies after Stripe finished, before our commit
            crashed.append(stripe_id)
            raise RuntimeError("worker lost its database connection")
        return stripe_id

    seeded([("t1", 5, JAN)], plan_for=("t1",))
    actors.bind(bound, provider_sync=crash_once_after_stripe)
    actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    run(stub_broker, stub_worker)
    [invoice] = invoices(bound)
    [stripe_invoice] = stripe.invoices.values()
    assert invoice.provider_invoice_id == stripe_invoice["id"] == crashed[0]
    assert stripe_invoice["status"] == "open"
    assert stripe_invoice["metadata[billing_invoice_id]"] == invoice.id
    assert sorted(item["amount"] for item in stripe.items) == ["1000", "5"]
    assert requests.count("/v1/invoices/search") >= 3  # each attempt looked before creating
    assert stub_broker.dead_letters == []
    client.close()


# --- the job functions --------------------------------------------------------------------


def test_the_invoice_job_never_calls_the_provider_and_hands_the_id_over_after_commit(
    session_factory, seeded, committed
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    handed: list[tuple[str, bool]] = []
    invoice_id = generate_monthly_invoice_job(
        session_factory, INVOICE_JAN, enqueue_sync=lambda i: handed.append((i, committed(i)))
    )
    assert handed == [(invoice_id, True)]
    assert invoices(session_factory)[0].provider_invoice_id is None


def test_an_enqueue_failure_raises_after_the_invoice_committed(
    session_factory, seeded, outbox
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))

    def down(invoice_id: str) -> None:
        raise redis.ConnectionError("Redis down")

    with pytest.raises(redis.ConnectionError):
        generate_monthly_invoice_job(session_factory, INVOICE_JAN, enqueue_sync=down)
    [invoice] = invoices(session_factory)  # kept: the scheduler's sweep will sync it
    assert invoice.provider_invoice_id is None
    assert len(outbox(INVOICE_CREATED)) == 1


def test_sync_refuses_bad_payloads_unknown_invoices_and_a_missing_provider(
    session_factory,
) -> None:
    from workers.errors import InvalidPayloadError

    def hook(invoice, lines) -> str:
        raise AssertionError("never called")

    with pytest.raises(InvalidPayloadError, match="invoice_id"):
        sync_invoice_job(session_factory, {"invoice_id": " "}, provider_sync=hook)
    with pytest.raises(InvalidPayloadError, match="tenant_id"):
        sync_invoice_job(session_factory, {"invoice_id": "i", "tenant_id": "t"}, provider_sync=hook)
    with pytest.raises(InvoiceNotFoundError):
        sync_invoice_job(session_factory, {"invoice_id": "nope"}, provider_sync=hook)
    with pytest.raises(ProviderSyncNotConfiguredError):
        sync_invoice_job(session_factory, {"invoice_id": "nope"}, provider_sync=None)


def test_the_job_handler_runs_the_sync_job_too(session_factory, seeded) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    queued: list[str] = []
    handler = make_billing_job_handler(
        session_factory=session_factory,
        provider_sync=lambda invoice, lines: f"ext_{invoice.tenant_id}",
        enqueue_sync=queued.append,
    )
    invoice_id = handler("billing.generate_monthly_invoice", INVOICE_JAN)
    assert queued == [invoice_id]
    assert handler(SYNC_INVOICE, {"invoice_id": invoice_id}) == "ext_t1"
    assert invoices(session_factory)[0].provider_invoice_id == "ext_t1"


def test_an_async_provider_hook_is_awaited(session_factory, seeded) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    invoice_id = generate_monthly_invoice_job(session_factory, INVOICE_JAN)

    async def hook(invoice, lines) -> str:
        return f"async_{len(lines)}"

    assert sync_invoice_job(session_factory, {"invoice_id": invoice_id}, provider_sync=hook) == (
        "async_2"
    )


def test_enqueue_sync_invoice_refuses_an_empty_id_and_sends_nothing(stub_broker) -> None:
    from workers.errors import InvalidPayloadError

    with pytest.raises(InvalidPayloadError):
        actors.enqueue_sync_invoice(invoice_id="")
    assert stub_broker.queues[QUEUE_NAME].qsize() == 0
    message = actors.enqueue_sync_invoice(invoice_id="inv_1")
    assert (message.actor_name, message.args) == (SYNC_INVOICE, ({"invoice_id": "inv_1"},))


def test_sync_retries_longer_than_the_ledger_jobs_by_default() -> None:
    from workers.settings import WorkerSettings

    settings = WorkerSettings()
    options = actors.options_for(actors.sync_invoice, settings)
    assert options["max_retries"] == 10
    assert options["max_backoff"] == 3_600_000
    # Delays double from 10 s up to 1 h, each jittered to between half and all of it: the
    # whole span stays under the sweep's SYNC_PENDING_AFTER, so the sweep doesn't race it.
    longest = sum(min(10 * 2**n, 3600) for n in range(options["max_retries"]))
    assert timedelta(seconds=longest) < settings.sync_pending_after


def test_a_duplicate_sync_message_does_nothing_when_one_already_stored_an_id(
    session_factory, seeded
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    invoice_id = generate_monthly_invoice_job(session_factory, INVOICE_JAN)
    calls = []

    def hook(invoice, lines):
        calls.append(invoice.id)
        return "prov_1"

    payload = {"invoice_id": invoice_id}
    assert sync_invoice_job(session_factory, payload, provider_sync=hook) == "prov_1"
    assert sync_invoice_job(session_factory, payload, provider_sync=hook) == "prov_1"
    assert calls == [invoice_id]
