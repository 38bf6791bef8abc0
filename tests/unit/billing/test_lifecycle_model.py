"""The invoice lifecycle against a model, for any interleaving (Hypothesis, stateful), on SQLite
and PostgreSQL.

Two tenants on one plan ($10 a month and 2¢ a token) record usage in two months, on time and
late, with keys reused (duplicates and conflicts); invoices are generated, finalized, paid,
marked uncollectible, voided, reissued and credited, with or without a grace period, under each
`LATE_USAGE` policy. After every step, read back from the database:

- a finalized invoice never changes (its lines, total and number, whatever its status);
- invoice numbers and credit note numbers are unique and gapless;
- every invoice's total is its lines; the month's invoice that is not void charges the pricing
  of its usage now (a draft) or as known when it was finalized; under `next_invoice`, that
  plus the adjustment lines later invoices bill for the month's invoices plus the adjustments
  pending for the next invoice equals pricing all the month's usage now (each late unit billed
  once); under `reject` late usage is refused and stores nothing, under `ignore` it is stored
  and billed nowhere;
- credit notes never exceed their invoice's total;
- each state change produced exactly one event, and nothing else did.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, delete, select

from billing import (
    BillingService,
    CreditExceedsInvoiceError,
    IdempotencyConflictError,
    InvoicePolicy,
    InvoiceStateError,
    PeriodClosedError,
)
from billing.db import make_session_factory
from billing.late_usage import LateUsage
from billing.models import (
    POSTGRESQL_METADATA,
    Base,
    CreditNote,
    Invoice,
    InvoiceLine,
    UsageEvent,
)
from tests.unit.billing.test_lifecycle import seed_plan
from webhooks.models import Base as WebhooksBase
from webhooks.models import WebhookEvent

MONTHS = [datetime(2025, month, 1, tzinfo=UTC) for month in (1, 2, 3)]
PERIODS = list(zip(MONTHS, MONTHS[1:], strict=False))
NOW = datetime(2025, 6, 1, tzinfo=UTC)
LOOKBACK = timedelta(days=400)  # every month's late usage is billed by the next invoice
TENANTS = ("t1", "t2")
FEE, TOKEN = 1000, 2
FINALIZED = ("open", "paid", "uncollectible")
OFFSETS = [timedelta(0), timedelta(days=9, hours=5), timedelta(days=27)]
# (source statuses, target, topic) of each service call; the target itself is a no-op
TRANSITIONS = {
    "finalize_invoice": ({"draft"}, "open", "billing.invoice.finalized"),
    "pay_invoice": ({"open", "uncollectible"}, "paid", "billing.invoice.paid"),
    "mark_uncollectible": ({"open"}, "uncollectible", "billing.invoice.marked_uncollectible"),
    "void_invoice": ({"draft", "open", "uncollectible"}, "void", "billing.invoice.voided"),
}


@dataclass
class ModelInvoice:
    id: str
    tenant: str
    period: int
    status: str
    number: str | None = None
    credited: int = 0
    billed: int | None = None  # what it bills once finalized: its usage known then

    @property
    def slot(self) -> tuple[str, int]:
        return self.tenant, self.period


@dataclass
class Model:
    grace: bool = False
    late_usage: LateUsage = "reject"
    usage: dict[tuple[str, str, str], tuple[int, datetime]] = field(default_factory=dict)
    invoices: list[ModelInvoice] = field(default_factory=list)
    numbers: int = 0
    credit_notes: int = 0
    events: Counter[tuple[str, str]] = field(default_factory=Counter)

    def live(self, tenant: str, period: int) -> ModelInvoice | None:
        return next(
            (
                i
                for i in self.invoices
                if (i.tenant, i.period) == (tenant, period) and i.status != "void"
            ),
            None,
        )

    def closed(self, tenant: str, period: int) -> bool:
        live = self.live(tenant, period)
        return live is not None and live.status in FINALIZED

    @property
    def rejects(self) -> bool:
        return self.late_usage == "reject"

    def expected_total(self, invoice: ModelInvoice) -> int:
        if invoice.billed is not None:
            return invoice.billed
        return self.price(invoice.tenant, invoice.period)

    def price(self, tenant: str, period: int) -> int:
        start, end = PERIODS[period]
        tokens = sum(
            amount
            for (who, metric, _), (amount, at) in self.usage.items()
            if who == tenant and metric == "tokens" and start <= at < end
        )
        return FEE + TOKEN * tokens


def wipe(engine: Engine) -> None:
    """Empty every billing and webhook table (each example starts from nothing)."""
    metadatas = [Base.metadata, WebhooksBase.metadata]
    if engine.dialect.name == "postgresql":  # the idempotency keys outlive deleted events
        metadatas.append(POSTGRESQL_METADATA)
    with engine.begin() as conn:
        for metadata in metadatas:
            for table in reversed(metadata.sorted_tables):
                conn.execute(delete(table))


def lifecycle_machine(engine: Engine, late_usage: LateUsage) -> type[RuleBasedStateMachine]:
    factory = make_session_factory(engine)

    class Lifecycle(RuleBasedStateMachine):
        """One example: a fresh database, a model, random calls, invariants after each."""

        def __init__(self) -> None:
            super().__init__()
            wipe(engine)
            with factory.begin() as session:
                seed_plan(session, TENANTS)
            self.model = Model(late_usage=late_usage)
            self.frozen: dict[str, tuple] = {}

        @initialize(
            grace=st.booleans(),
            invoiced=st.sets(st.sampled_from(TENANTS), min_size=1),
            amount=st.sampled_from([0, 5, 60]),
        )
        def start(self, grace: bool, invoiced: set[str], amount: int) -> None:
            """The grace period, and the first month used and invoiced for some tenants."""
            self.model.grace = grace
            for tenant in sorted(invoiced):
                if amount:
                    self._record(tenant, "tokens", "s", amount, 0, OFFSETS[1])
                self._generate(tenant, 0)

        def service(self, session, tenant: str) -> BillingService:
            policy = InvoicePolicy(
                grace_period=timedelta(days=3) if self.model.grace else timedelta(0),
                late_usage=self.model.late_usage,
                late_usage_lookback=LOOKBACK,
            )
            return BillingService(session=session, tenant_id=tenant, now=lambda: NOW, policy=policy)

        # --- usage ------------------------------------------------------------------------

        @rule(
            tenant=st.sampled_from(TENANTS),
            metric=st.sampled_from(["tokens", "tokens", "calls"]),
            key=st.sampled_from(["k0", "k1", "k2", "k3", "k4", "k5"]),
            amount=st.sampled_from([1, 40, 300]),
            period=st.integers(0, len(PERIODS) - 1),
            offset=st.sampled_from(OFFSETS + ["last-instant"]),
        )
        def record_usage(self, tenant, metric, key, amount, period, offset) -> None:
            self._record(tenant, metric, key, amount, period, offset)

        @precondition(lambda self: self.model.invoices)
        @rule(
            pick=st.integers(0, 50),
            key=st.sampled_from(["m0", "m1", "m2", "m3"]),
            amount=st.sampled_from([7, 120]),
            offset=st.sampled_from(OFFSETS + ["last-instant"]),
        )
        def record_usage_in_an_invoiced_month(self, pick, key, amount, offset) -> None:
            """On time for a draft (re-priced), late for a finalized invoice."""
            invoice = self.model.invoices[pick % len(self.model.invoices)]
            self._record(invoice.tenant, "tokens", key, amount, invoice.period, offset)

        def _record(self, tenant, metric, key, amount, period, offset) -> None:
            start, end = PERIODS[period]
            at = end - timedelta(microseconds=1) if offset == "last-instant" else start + offset
            known = self.model.usage.get((tenant, metric, key))
            expected: type[Exception] | None = None
            if known is not None and known != (amount, at):
                expected = IdempotencyConflictError
            elif known is None and self.model.closed(tenant, period) and self.model.rejects:
                expected = PeriodClosedError  # late usage; `ignore` stores it, billed nowhere
            refused: type[Exception] | None = None
            with factory() as session:
                try:
                    self.service(session, tenant).record_usage(
                        metric=metric, amount=amount, at=at, idempotency_key=key
                    )
                    session.commit()
                except (IdempotencyConflictError, PeriodClosedError) as error:
                    refused = type(error)
            assert refused is expected
            if refused is None:
                self.model.usage[(tenant, metric, key)] = (amount, at)

        # --- invoices ---------------------------------------------------------------------

        @rule(tenant=st.sampled_from(TENANTS), period=st.integers(0, len(PERIODS) - 1))
        def generate(self, tenant, period) -> None:
            self._generate(tenant, period)

        def _generate(self, tenant, period) -> None:
            start, end = PERIODS[period]
            with factory.begin() as session:
                invoice_id = self.service(session, tenant).generate_monthly_invoice(
                    period_start=start, period_end=end, currency="usd"
                )
            live = self.model.live(tenant, period)
            if live is not None:
                assert invoice_id == live.id  # generated again: the same invoice
                return
            assert invoice_id not in {i.id for i in self.model.invoices}  # a reissue is new
            invoice = ModelInvoice(invoice_id, tenant, period, "draft")
            self.model.invoices.append(invoice)
            self.model.events["billing.invoice.created", invoice_id] += 1
            if not self.model.grace:
                self._moved(invoice, "open", "billing.invoice.finalized")

        @precondition(lambda self: self.model.invoices)
        @rule(pick=st.integers(0, 50), call=st.sampled_from(sorted(TRANSITIONS)))
        def change(self, pick, call) -> None:
            invoice = self.model.invoices[pick % len(self.model.invoices)]
            sources, target, topic = TRANSITIONS[call]
            with factory() as session:
                try:
                    changed = getattr(self.service(session, invoice.tenant), call)(invoice.id)
                    session.commit()
                except InvoiceStateError:
                    assert invoice.status not in sources | {target}, (call, invoice.status)
                    return
            assert invoice.status in sources | {target}, (call, invoice.status)
            assert changed.status == target
            if invoice.status != target:
                self._moved(invoice, target, topic)

        @precondition(lambda self: self.model.invoices)
        @rule(pick=st.integers(0, 50), amount=st.sampled_from([1, 250, 999, 1500]))
        def credit(self, pick, amount) -> None:
            invoice = self.model.invoices[pick % len(self.model.invoices)]
            with factory() as session:
                try:
                    note = self.service(session, invoice.tenant).create_credit_note(
                        invoice.id, amount=amount, reason="goodwill"
                    )
                    session.commit()
                except InvoiceStateError:
                    assert invoice.status not in ("open", "paid"), invoice.status
                    return
                except CreditExceedsInvoiceError:
                    assert invoice.credited + amount > self.frozen[invoice.id][1]
                    return
            assert invoice.status in ("open", "paid")
            assert invoice.credited + amount <= self.frozen[invoice.id][1]
            self.model.credit_notes += 1
            assert note.number == f"CN-{self.model.credit_notes:06d}"
            invoice.credited += amount
            self.model.events["billing.credit_note.created", note.id] += 1

        def _moved(self, invoice: ModelInvoice, target: str, topic: str) -> None:
            if target == "open":
                self.model.numbers += 1
                invoice.number = f"INV-{self.model.numbers:06d}"
                invoice.billed = self.model.price(invoice.tenant, invoice.period)
            invoice.status = target
            self.model.events[topic, invoice.id] += 1

        # --- invariants -------------------------------------------------------------------

        @invariant()
        def the_database_is_the_model(self) -> None:
            with factory() as session:
                rows = {i.id: i for i in session.execute(select(Invoice)).scalars()}
                lines = _lines(session)
                events = _events(session)
                stored_usage = session.execute(
                    select(UsageEvent.tenant_id, UsageEvent.metric, UsageEvent.idempotency_key)
                ).all()
                credit_numbers = sorted(session.execute(select(CreditNote.number)).scalars())
                pending = Counter[str]()
                for tenant in TENANTS:
                    for late in self.service(session, tenant).pending_adjustments(currency="usd"):
                        pending[late.adjusts_invoice_id] += late.amount
                credited = Counter[str]()
                for invoice_id, amount in session.execute(
                    select(CreditNote.invoice_id, CreditNote.amount)
                ):
                    credited[invoice_id] += amount
            assert sorted(map(tuple, stored_usage)) == sorted(
                self.model.usage
            )  # refusals stored nothing
            assert events == self.model.events  # one event per change, nothing else
            numbers = sorted(r.number for r in rows.values() if r.number is not None)
            assert numbers == [f"INV-{n:06d}" for n in range(1, self.model.numbers + 1)]
            assert credit_numbers == [f"CN-{n:06d}" for n in range(1, self.model.credit_notes + 1)]
            adjusted = Counter[str]()  # billed later, on invoices that are not void
            for invoice_id, invoice_lines in lines.items():
                for kind, _, _, amount, adjusts in invoice_lines:
                    if kind == "adjustment" and rows[invoice_id].status != "void":
                        adjusted[adjusts] += amount
            for invoice in self.model.invoices:
                row = rows[invoice.id]
                assert (row.status, row.number) == (invoice.status, invoice.number)
                assert row.total_amount == sum(line[3] for line in lines[invoice.id])
                charged = sum(line[3] for line in lines[invoice.id] if line[0] == "charge")
                assert credited[invoice.id] == invoice.credited <= row.total_amount
                snapshot = (tuple(lines[invoice.id]), row.total_amount, row.number)
                if invoice.id in self.frozen:
                    assert snapshot == self.frozen[invoice.id], "a finalized invoice changed"
                elif invoice.status != "draft" and invoice.number is not None:
                    self.frozen[invoice.id] = snapshot
                live = self.model.live(invoice.tenant, invoice.period)
                if live is not invoice:
                    continue
                assert charged == self.model.expected_total(invoice)  # its usage then
                if self.model.late_usage == "next_invoice" and invoice.billed is not None:
                    # the month's invoices, what later invoices bill for them, and what the
                    # next one will: all the month's usage now
                    month = [i.id for i in self.model.invoices if i.slot == invoice.slot]
                    later = sum(adjusted[i] + pending[i] for i in month)
                    assert charged + later == self.model.price(*invoice.slot)

    return Lifecycle


def _lines(session) -> dict[str, list[tuple[str, str, int, int, str]]]:
    """Each invoice's lines as sorted (kind, metric, quantity, amount, adjusted invoice id)."""
    found: dict[str, list[tuple[str, str, int, int, str]]] = {
        invoice_id: [] for invoice_id in session.execute(select(Invoice.id)).scalars()
    }
    query = select(
        InvoiceLine.invoice_id,
        InvoiceLine.kind,
        InvoiceLine.metric,
        InvoiceLine.quantity,
        InvoiceLine.amount,
        InvoiceLine.adjusts_invoice_id,
    )
    for invoice_id, kind, metric, quantity, amount, adjusts in session.execute(query):
        found[invoice_id].append((kind, metric or "", quantity, amount, adjusts or ""))
    return {invoice_id: sorted(rows) for invoice_id, rows in found.items()}


def _events(session) -> Counter[tuple[str, str]]:
    found = Counter[tuple[str, str]]()
    for topic, payload in session.execute(select(WebhookEvent.topic, WebhookEvent.payload)):
        subject = (
            payload["credit_note_id"] if "credit_note_id" in payload else payload["invoice_id"]
        )
        found[topic, subject] += 1
    return found


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@pytest.mark.parametrize("late_usage", ["reject", "ignore", "next_invoice"])
def test_the_invoice_lifecycle_keeps_its_invariants(engine, late_usage) -> None:
    run_state_machine_as_test(
        lifecycle_machine(engine, late_usage),
        settings=settings(
            max_examples=4,  # per database and policy: a few seconds each
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )
