"""What the scheduler enqueues, streamed from the database in batches.

The fan-out never builds one list of every tenant: on PostgreSQL each query runs once and its
rows arrive `batch_size` at a time through a server-side cursor; elsewhere (SQLite) it reads
keyset pages of `batch_size` rows, each in a short transaction of its own. Each row is sent
before the next batch is read. Callers that may stop early iterate inside
`contextlib.closing(...)` so the cursor is closed at once.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime, tzinfo

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select, tuple_, union
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from billing import tenants
from billing.late_usage import FINALIZED
from billing.localtime import UTC_NAME, local_day
from billing.models import Invoice, InvoiceLine, Price, Subscription, Tenant, UsageEvent
from billing.periods import subscription_active_in


@dataclass(frozen=True)
class Filter:
    """Restricts a fan-out to one tenant and/or one metric (the CLI's backfills), and/or to the
    tenants billed in one zone (`UTC`: those with no row too)."""

    tenant_id: str | None = None
    metric: str | None = None
    zone: str | None = None

    @property
    def tz(self) -> tzinfo:
        """The zone whose days and months the fan-out cuts (UTC when none is named)."""
        return tenants.zone(self.zone or UTC_NAME)


def zone_names(session_factory: sessionmaker[Session], only: Filter = Filter()) -> list[str]:
    """The zones to fan out in: `UTC` first (every tenant without a row is billed in it), then
    each other zone some tenant has, by name; only the named tenant's or zone with `only`."""
    if only.zone is not None:
        return [only.zone]
    with session_factory() as session:
        if only.tenant_id is not None:
            return [tenants.zone_name_of(session, only.tenant_id)]
        return zones_in_use(session)


def zones_in_use(session: Session) -> list[str]:
    """`UTC`, then each other zone some tenant is billed in, by name."""
    others = session.scalars(
        select(Tenant.timezone)
        .where(Tenant.timezone != UTC_NAME)
        .distinct()
        .order_by(Tenant.timezone)
    )
    return [UTC_NAME, *others]


def _in_zone(tenant_id: InstrumentedAttribute[str], zone: str) -> ColumnElement[bool]:
    """SQL condition: the tenant is billed in `zone`."""
    if zone == UTC_NAME:
        return tenant_id.not_in(select(Tenant.id).where(Tenant.timezone != UTC_NAME))
    return tenant_id.in_(select(Tenant.id).where(Tenant.timezone == zone))


def _usage_pairs_query(day: datetime, only: Filter) -> Select[str, str]:
    start, end = local_day(only.tz, day)
    query = (
        select(UsageEvent.tenant_id, UsageEvent.metric)
        .where(UsageEvent.at_ts >= start, UsageEvent.at_ts < end)
        .distinct()
    )
    if only.tenant_id is not None:
        query = query.where(UsageEvent.tenant_id == only.tenant_id)
    if only.zone is not None:
        query = query.where(_in_zone(UsageEvent.tenant_id, only.zone))
    if only.metric is not None:
        query = query.where(UsageEvent.metric == only.metric)
    return query


def usage_pairs(
    session_factory: sessionmaker[Session],
    day: datetime,
    *,
    batch_size: int,
    only: Filter = Filter(),
) -> Generator[tuple[str, str], None, None]:
    """Every (tenant, metric) with usage in the day containing `day` (the local day of
    `only.zone`, else the UTC day), streamed."""
    yield from _stream(session_factory, _usage_pairs_query(day, only), batch_size)


def count_usage_pairs(
    session_factory: sessionmaker[Session], day: datetime, *, only: Filter = Filter()
) -> int:
    """How many pairs `usage_pairs` will yield (for a progress bar)."""
    inner = _usage_pairs_query(day, only).subquery()
    with session_factory() as session:
        return int(session.execute(select(func.count()).select_from(inner)).scalar_one())


def invoice_targets_query(
    start: datetime,
    end: datetime,
    only: Filter = Filter(),
    *,
    late_since: datetime | None = None,
) -> Select[str, str]:
    """(tenant, currency) pairs to invoice for `[start, end)` (see `invoice_targets`)."""
    query = (
        select(Subscription.tenant_id, Price.currency)
        .join(Price, Price.plan_id == Subscription.plan_id)
        .where(subscription_active_in(start, end))
        .distinct()
    )
    if only.tenant_id is not None:
        query = query.where(Subscription.tenant_id == only.tenant_id)
    if only.zone is not None:
        query = query.where(_in_zone(Subscription.tenant_id, only.zone))
    if late_since is None:
        return query
    both = union(query, _late_usage_targets_query(start, late_since, only)).subquery()
    return select(both.c.tenant_id, both.c.currency)


def _late_usage_targets_query(start: datetime, since: datetime, only: Filter) -> Select[str, str]:
    """(tenant, currency) of finalized invoices of a period that ended before `start` and at or
    after `since`, with usage in their period stored after they were finalized and after the
    last adjustment billed for them: late usage to bill, also once the subscription ended."""
    billed_last = (
        select(func.max(InvoiceLine.created_at))
        .where(InvoiceLine.adjusts_invoice_id == Invoice.id)
        .scalar_subquery()
    )
    late_usage = exists().where(
        UsageEvent.tenant_id == Invoice.tenant_id,
        UsageEvent.at_ts >= Invoice.period_start,
        UsageEvent.at_ts < Invoice.period_end,
        UsageEvent.created_at > func.coalesce(billed_last, Invoice.finalized_at),
    )
    query = (
        select(Invoice.tenant_id, Invoice.currency)
        .where(
            Invoice.status.in_(FINALIZED),
            Invoice.period_end <= start,
            Invoice.period_end >= since,
            late_usage,
        )
        .distinct()
    )
    if only.tenant_id is not None:
        query = query.where(Invoice.tenant_id == only.tenant_id)
    if only.zone is not None:
        query = query.where(_in_zone(Invoice.tenant_id, only.zone))
    return query


def invoice_targets(
    session_factory: sessionmaker[Session],
    start: datetime,
    end: datetime,
    *,
    batch_size: int,
    only: Filter = Filter(),
    late_since: datetime | None = None,
) -> Generator[tuple[str, str], None, None]:
    """Every (tenant, currency) to invoice for `[start, end)`: a subscription active in the
    period whose plan has prices in that currency; with `late_since` (the clock less
    `LATE_USAGE_LOOKBACK`), also a tenant with late usage of a finalized invoice whose period
    ended since (`LATE_USAGE=next_invoice`), even with no subscription left. Streamed."""
    query = invoice_targets_query(start, end, only, late_since=late_since)
    yield from _stream(session_factory, query, batch_size)


def count_invoice_targets(
    session_factory: sessionmaker[Session],
    start: datetime,
    end: datetime,
    *,
    only: Filter = Filter(),
    late_since: datetime | None = None,
) -> int:
    """How many targets `invoice_targets` will yield."""
    inner = invoice_targets_query(start, end, only, late_since=late_since).subquery()
    with session_factory() as session:
        return int(session.execute(select(func.count()).select_from(inner)).scalar_one())


def unsynced_invoices_query(created_after: datetime, created_before: datetime) -> Select[str, str]:
    """(invoice id, tenant) of the invoices the provider lags behind, changed in `[after,
    before)`: finalized invoices created then without a provider id (drafts are not synced),
    and synced ones paid or voided then that the provider was not told of."""
    changed_at = func.coalesce(Invoice.paid_at, Invoice.voided_at)
    return select(Invoice.id, Invoice.tenant_id).where(
        or_(
            and_(
                Invoice.provider_invoice_id.is_(None),
                Invoice.status.in_(["open", "paid", "uncollectible"]),
                Invoice.created_at >= created_after,
                Invoice.created_at < created_before,
            ),
            and_(
                Invoice.provider_invoice_id.is_not(None),
                Invoice.status.in_(["paid", "void"]),
                Invoice.provider_status.is_distinct_from(Invoice.status),
                changed_at >= created_after,
                changed_at < created_before,
            ),
        )
    )


def due_drafts(
    session_factory: sessionmaker[Session], created_before: datetime, *, batch_size: int
) -> Generator[tuple[str, str], None, None]:
    """Every (invoice id, tenant) still a draft that was created before `created_before` (its
    grace period has ended), streamed."""
    query = select(Invoice.id, Invoice.tenant_id).where(
        Invoice.status == "draft", Invoice.created_at < created_before
    )
    yield from _stream(session_factory, query, batch_size)


def unsynced_invoices(
    session_factory: sessionmaker[Session],
    created_after: datetime,
    created_before: datetime,
    *,
    batch_size: int,
) -> Generator[tuple[str, str], None, None]:
    """Every (invoice id, tenant) created in `[after, before)` that has no provider id yet."""
    query = unsynced_invoices_query(created_after, created_before)
    yield from _stream(session_factory, query, batch_size)


def _stream(
    session_factory: sessionmaker[Session], query: Select[str, str], batch_size: int
) -> Generator[tuple[str, str], None, None]:
    with session_factory() as session:
        dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        yield from _server_side_cursor(session_factory, query, batch_size)
    else:
        yield from _keyset_pages(session_factory, query, batch_size)


def _server_side_cursor(
    session_factory: sessionmaker[Session], query: Select[str, str], batch_size: int
) -> Generator[tuple[str, str], None, None]:
    """One scan, `batch_size` rows per fetch (PostgreSQL's server-side cursor)."""
    with session_factory() as session:
        rows = session.execute(query, execution_options={"yield_per": batch_size})
        try:
            for row in rows:
                yield row[0], row[1]
        finally:
            rows.close()  # a server-side cursor must be closed even when the caller stops early


def _keyset_pages(
    session_factory: sessionmaker[Session], query: Select[str, str], batch_size: int
) -> Generator[tuple[str, str], None, None]:
    """Pages in key order, each read in its own short transaction.

    SQLite has a single writer: a read transaction held open across the whole fan-out would sit
    beside the jobs that write (`billing aggregate --inline`, `billing run`), so each page is
    read and released before its rows are handed out.
    """
    first, second = query.selected_columns
    after: tuple[str, str] | None = None
    while True:
        page_query = query.order_by(first, second).limit(batch_size)
        if after is not None:
            page_query = page_query.where(tuple_(first, second) > tuple_(*after))
        with session_factory() as session:
            page = [(row[0], row[1]) for row in session.execute(page_query)]
        yield from page
        if len(page) < batch_size:
            return
        after = page[-1]
