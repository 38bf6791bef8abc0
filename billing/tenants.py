"""Tenants: a name and the IANA time zone whose days and months the tenant is billed in.

A tenant needs no row: one without is billed in UTC, exactly as before tenants existed. An
operator creates or changes a row with `set_tenant` (`PUT /_billing/tenants/{id}`, `billing
tenants set`). The zone can change only while the tenant has no invoice other than void ones
(a draft counts: its period was cut in the old zone): invoiced days never move. A change drops
the tenant's daily aggregates, cut in the old zone; the daily fan-out (or `billing aggregate`)
computes them again in the new one. Its usage counters (quotas) are counted again at once.
"""

from __future__ import annotations

import functools
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from sqlalchemy import bindparam, delete, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing import driver_sql
from billing.counters import recount
from billing.errors import (
    InvalidPeriodError,
    InvalidTimezoneError,
    InvalidUsageError,
    TimezoneLockedError,
)
from billing.ledger import validate_tenant
from billing.localtime import UTC_NAME, Period, is_midnight, local_day
from billing.localtime import zone as zone  # `tenants.zone`, as before it moved
from billing.models import Invoice, Tenant, UsageAggregate
from webhooks.safetext import safe_text
from webhooks.sqltypes import utcnow

MAX_NAME_LENGTH = 200
#: In the zone database of some machines but not a place: what they mean differs by machine.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@dataclass(frozen=True, slots=True)
class TenantInfo:
    """A tenant's settings as stored (`created_at` is None for a tenant without a row)."""

    id: str
    name: str
    timezone: str
    created_at: datetime | None


@functools.cache
def known_zones() -> frozenset[str]:
    """The IANA zone names this machine's zone database holds (read once)."""
    return frozenset(zoneinfo.available_timezones() - _NOT_ZONES)


def validate_timezone(name: object) -> str:
    """Return `name` if it is an IANA time zone name known here (`UTC`, `Asia/Kathmandu`).

    Raises:
        InvalidTimezoneError: anything else (the message names it, made printable).
    """
    if not isinstance(name, str) or name not in known_zones():
        shown = safe_text(name[:64]) if isinstance(name, str) else type(name).__name__
        raise InvalidTimezoneError(f"unknown time zone {shown!r}: use an IANA name such as UTC")
    return name


def set_tenant(
    session: Session,
    tenant_id: str,
    *,
    name: str | None = None,
    timezone: str | None = None,
) -> TenantInfo:
    """Create the tenant's row or change the fields given; return the tenant as stored.

    A new row gets `name` (default: the id) and `timezone` (default: `UTC`). A zone change
    takes the tenant's zone lock (PostgreSQL) before it looks for invoices, so a racing invoice
    run or aggregation either reads the new zone or commits in the old one first (and then
    its invoice refuses the change, or its aggregate is dropped with the others). A change
    also counts the tenant's events again into `usage_counters` of the new zone (quotas, `GET
    /usage`); the writers of the tenant's events wait for it (`billing.counters`).

    Raises:
        InvalidUsageError: a malformed id or name (`.field` names it); nothing is stored.
        InvalidTimezoneError: `timezone` is not an IANA name; nothing is stored.
        TimezoneLockedError: the zone would change while an invoice exists; nothing is stored.
    """
    tenant_id = validate_tenant(tenant_id)
    if name is not None:
        name = _validate_name(name)
    if timezone is not None:
        timezone = validate_timezone(timezone)
        _lock_zone(session, tenant_id, shared=False)
        if timezone != zone_name_of(session, tenant_id):
            _check_no_invoice(session, tenant_id)
    dialect = session.get_bind().dialect.name
    insert: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Tenant)
    session.execute(
        insert.values(
            id=tenant_id, name=name or tenant_id, timezone=UTC_NAME, created_at=utcnow()
        ).on_conflict_do_nothing(index_elements=["id"])
    )
    row = session.execute(
        select(Tenant)
        .where(Tenant.id == tenant_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    if name is not None:
        row.name = name
    if timezone is not None and timezone != row.timezone:
        session.execute(
            delete(UsageAggregate).where(
                UsageAggregate.tenant_id == tenant_id, UsageAggregate.granularity == "day"
            )
        )
        row.timezone = timezone
        session.flush()
        recount(session, tenant_id)
    session.flush()
    return _info(row)


def get_tenant(session: Session, tenant_id: str) -> TenantInfo:
    """The tenant's settings; the defaults (UTC) for a tenant without a row."""
    row = session.get(Tenant, tenant_id)
    if row is None:
        return TenantInfo(tenant_id, tenant_id, UTC_NAME, None)
    return _info(row)


def list_tenants(session: Session) -> list[TenantInfo]:
    """Every tenant that has a row, by id."""
    rows = session.execute(select(Tenant).order_by(Tenant.id)).scalars()
    return [_info(row) for row in rows]


def zone_name_of(session: Session, tenant_id: str, *, lock: bool = False) -> str:
    """The tenant's zone name (`UTC` without a row).

    With `lock` (PostgreSQL), the zone cannot change until the transaction ends: what is cut
    from it (a day's aggregate, an invoice's period) commits in the zone it was read in. The
    lock is shared, so invoice runs and aggregations of the tenant do not wait for each other.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Run for every invoice: both statements on the driver's cursor (`billing.driver_sql`).
        session.flush()  # what the caller added is read, as `session.execute` would
        if lock:
            driver_sql.rows(session, _ZONE_LOCK_SHARED_SQL, {"key": zone_lock_key(tenant_id)})
        found = driver_sql.rows(session, _ZONE_OF_SQL.sql, {"tenant_id": tenant_id})
        return str(found[0][0]) if found and found[0][0] else UTC_NAME
    return session.execute(_ZONE_OF, {"tenant_id": tenant_id}).scalar_one_or_none() or UTC_NAME


# Read for every invoice and aggregation: built once.
_ZONE_OF = select(Tenant.timezone).where(Tenant.id == bindparam("tenant_id"))
_ZONE_OF_SQL = driver_sql.compiled(_ZONE_OF)
_ZONE_LOCK_SHARED_SQL = "SELECT pg_advisory_xact_lock_shared(hashtextextended(%(key)s, 0))"


def tenant_zone(session: Session, tenant_id: str, *, lock: bool = False) -> tzinfo:
    """The tenant's `tzinfo` (UTC without a row); `lock` as in `zone_name_of`."""
    return zone(zone_name_of(session, tenant_id, lock=lock))


def tenant_day(session: Session, tenant_id: str, moment: datetime) -> Period:
    """The tenant's local day containing `moment`, its zone locked as in `zone_name_of`."""
    return local_day(tenant_zone(session, tenant_id, lock=True), moment)


def check_period(zone_name: str, start: datetime, end: datetime) -> None:
    """An invoice period of a tenant with a zone other than UTC runs from a local midnight to
    a local midnight (the scheduler sends local months); a UTC tenant's may be any instants.

    Raises:
        InvalidPeriodError: a bound is not a local midnight of the zone.
    """
    if zone_name == UTC_NAME:
        return
    tz = zone(zone_name)
    for name, moment in (("period_start", start), ("period_end", end)):
        if not is_midnight(tz, moment):
            raise InvalidPeriodError(
                f"{name} {moment.isoformat()} is not a midnight in {zone_name}, the tenant's "
                f"zone: its invoice periods run from local midnight to local midnight"
            )


def _lock_zone(session: Session, tenant_id: str, *, shared: bool) -> None:
    """A transaction-level advisory lock on the tenant's zone (PostgreSQL; SQLite has one
    writer at a time). Its own statement: what is read after it sees the holder's commit."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            _ZONE_LOCK_SHARED if shared else _ZONE_LOCK, {"key": zone_lock_key(tenant_id)}
        )


def zone_lock_key(tenant_id: str) -> str:
    """The key of the tenant's zone lock (`hashtextextended` of it is the advisory lock's id)."""
    return f"billing.tenant-zone:{tenant_id}"


_ZONE_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
_ZONE_LOCK_SHARED = text("SELECT pg_advisory_xact_lock_shared(hashtextextended(:key, 0))")


def _check_no_invoice(session: Session, tenant_id: str) -> None:
    invoice_id = session.execute(
        select(Invoice.id)
        .where(Invoice.tenant_id == tenant_id, Invoice.status != "void")
        .order_by(Invoice.created_at)
        .limit(1)
    ).scalar_one_or_none()
    if invoice_id is not None:
        raise TimezoneLockedError(
            f"tenant {safe_text(tenant_id)!r} has invoice {invoice_id} cut in its current zone; "
            "void its invoices to change the zone",
            invoice_id=invoice_id,
        )


def _validate_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name.strip()
        or len(name) > MAX_NAME_LENGTH
        or "\x00" in name
    ):
        raise InvalidUsageError(
            f"name must be 1 to {MAX_NAME_LENGTH} characters, not only spaces", field="name"
        )
    return name


def _info(row: Tenant) -> TenantInfo:
    return TenantInfo(row.id, row.name, row.timezone, row.created_at)
