"""Tenants: a name and the IANA time zone whose days and months the tenant is billed in.

A tenant needs no row: one without is billed in UTC, exactly as before tenants existed. An
operator creates or changes a row with `set_tenant` (`PUT /_billing/tenants/{id}`, `billing
tenants set`). The zone can change only while the tenant has no invoice other than void ones
(a draft counts: its period was cut in the old zone): invoiced days never move. A change drops
the tenant's daily aggregates, cut in the old zone; the daily fan-out (or `billing aggregate`)
computes them again in the new one.
"""

from __future__ import annotations

import functools
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.errors import InvalidTimezoneError, InvalidUsageError, TimezoneLockedError
from billing.ledger import validate_tenant
from billing.localtime import UTC_NAME
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


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> tzinfo:
    """The `tzinfo` of a validated zone name."""
    return zoneinfo.ZoneInfo(name)


def set_tenant(
    session: Session,
    tenant_id: str,
    *,
    name: str | None = None,
    timezone: str | None = None,
) -> TenantInfo:
    """Create the tenant's row or change the fields given; return the tenant as stored.

    A new row gets `name` (default: the id) and `timezone` (default: `UTC`). The row is locked
    (PostgreSQL) while its invoices are checked, so a racing invoice run either sees the new
    zone or holds the old one until its invoice exists.

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
        _check_no_invoice(session, tenant_id)
        session.execute(
            delete(UsageAggregate).where(
                UsageAggregate.tenant_id == tenant_id, UsageAggregate.granularity == "day"
            )
        )
        row.timezone = timezone
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
    """The tenant's zone name (`UTC` without a row). With `lock`, the row is share-locked on
    PostgreSQL until the transaction ends, so the zone cannot change under an invoice run."""
    query = select(Tenant.timezone).where(Tenant.id == tenant_id)
    if lock:
        query = query.with_for_update(read=True)
    return session.execute(query).scalar_one_or_none() or UTC_NAME


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
