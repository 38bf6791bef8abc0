"""Tenants: rows with an IANA zone, set by operators; the zone is locked once invoiced."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from billing.errors import InvalidTimezoneError, InvalidUsageError, TimezoneLockedError
from billing.models import Invoice, Tenant, UsageAggregate
from billing.tenants import (
    get_tenant,
    list_tenants,
    set_tenant,
    validate_timezone,
    zone,
    zone_name_of,
)
from workers.cli import main

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


def _invoice(session, status: str, tenant: str = "t1") -> str:
    invoice = Invoice(
        tenant_id=tenant,
        period_start=JAN,
        period_end=FEB,
        status=status,
        total_amount=100,
        currency="usd",
    )
    session.add(invoice)
    session.flush()
    return invoice.id


def test_a_tenant_without_a_row_is_on_utc(session) -> None:
    info = get_tenant(session, "nobody")
    assert (info.id, info.name, info.timezone, info.created_at) == ("nobody", "nobody", "UTC", None)
    assert zone_name_of(session, "nobody") == "UTC"
    assert list_tenants(session) == []


def test_set_tenant_creates_then_changes_only_the_fields_given(session) -> None:
    created = set_tenant(session, "t1")
    assert (created.name, created.timezone) == ("t1", "UTC")
    assert created.created_at is not None
    zoned = set_tenant(session, "t1", timezone="America/New_York")
    assert (zoned.name, zoned.timezone) == ("t1", "America/New_York")
    renamed = set_tenant(session, "t1", name="Acme")
    assert (renamed.name, renamed.timezone) == ("Acme", "America/New_York")
    assert zone_name_of(session, "t1", lock=True) == "America/New_York"
    assert [t.id for t in list_tenants(session)] == ["t1"]


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus", "america/new_york", "", "localtime", "../etc/passwd", "EST\n", 5]
)
def test_unknown_zones_are_refused_by_name_and_nothing_is_stored(session, zone) -> None:
    with pytest.raises(InvalidTimezoneError, match="unknown time zone") as raised:
        set_tenant(session, "t1", timezone=zone)
    assert raised.value.field == "timezone"
    assert session.scalar(select(func.count()).select_from(Tenant)) == 0


def test_the_message_escapes_what_it_names() -> None:
    with pytest.raises(InvalidTimezoneError) as raised:
        validate_timezone("\x1b[31mRed")
    assert "\x1b" not in str(raised.value)


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "a\x00b"])
def test_a_malformed_name_is_refused(session, name) -> None:
    with pytest.raises(InvalidUsageError) as raised:
        set_tenant(session, "t1", name=name)
    assert raised.value.field == "name"


@pytest.mark.parametrize("status", ["draft", "open", "paid", "uncollectible"])
def test_the_zone_is_locked_by_any_invoice_not_void(session, status) -> None:
    set_tenant(session, "t1", timezone="Asia/Kathmandu")
    invoice_id = _invoice(session, status)
    with pytest.raises(TimezoneLockedError) as raised:
        set_tenant(session, "t1", timezone="America/New_York")
    assert raised.value.invoice_id == invoice_id
    assert get_tenant(session, "t1").timezone == "Asia/Kathmandu"


def test_with_invoices_the_name_and_the_same_zone_may_still_be_set(session) -> None:
    set_tenant(session, "t1", timezone="Asia/Kathmandu")
    _invoice(session, "open")
    assert set_tenant(session, "t1", name="Acme", timezone="Asia/Kathmandu").name == "Acme"


def test_void_invoices_and_other_tenants_invoices_do_not_lock_the_zone(session) -> None:
    _invoice(session, "void")
    _invoice(session, "open", tenant="t2")
    assert set_tenant(session, "t1", timezone="Asia/Kathmandu").timezone == "Asia/Kathmandu"


def test_an_invoiced_tenant_without_a_row_cannot_leave_utc(session) -> None:
    _invoice(session, "paid")
    with pytest.raises(TimezoneLockedError):
        set_tenant(session, "t1", timezone="Asia/Kathmandu")


def test_a_zone_change_drops_the_daily_aggregates_cut_in_the_old_zone(session) -> None:
    for tenant in ("t1", "t2"):
        session.add(
            UsageAggregate(
                tenant_id=tenant, metric="m", period_start=JAN, granularity="day", total=5
            )
        )
    session.flush()
    set_tenant(session, "t1", name="same zone", timezone="UTC")
    assert session.scalar(select(func.count()).select_from(UsageAggregate)) == 2
    set_tenant(session, "t1", timezone="Asia/Kathmandu")
    left = session.scalars(select(UsageAggregate.tenant_id)).all()
    assert left == ["t2"]


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def cli(sqlite_engine, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))


def test_billing_tenants_set_and_list(cli, capsys) -> None:
    assert main(["tenants", "set", "t1", "--timezone", "America/New_York", "--name", "Acme"]) == 0
    assert capsys.readouterr().out == "tenant t1 (Acme) is billed in America/New_York\n"
    assert main(["tenants", "list", "--json"]) == 0
    listed = capsys.readouterr().out
    assert '"timezone": "America/New_York"' in listed
    assert '"name": "Acme"' in listed


def test_billing_tenants_set_refuses_an_unknown_zone_in_one_line(cli, capsys) -> None:
    assert main(["tenants", "set", "t1", "--timezone", "Mars/Olympus"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "billing tenants set: unknown time zone 'Mars/Olympus': use an IANA name such as UTC\n"
    )


def test_a_refused_zone_change_creates_no_row_either(session) -> None:
    _invoice(session, "open")
    with pytest.raises(TimezoneLockedError):
        set_tenant(session, "t1", name="Acme", timezone="Asia/Kathmandu")
    assert session.scalar(select(func.count()).select_from(Tenant)) == 0


def test_zones_resolve_from_the_tzdata_package_when_the_os_has_no_zone_database() -> None:
    # PYTHONTZPATH="" leaves zoneinfo no system directory: only the tzdata package answers.
    probe = (
        "from billing.tenants import known_zones, validate_timezone, zone;"
        "from datetime import datetime;"
        "assert {'Asia/Kathmandu', 'America/New_York'} <= known_zones();"
        "print(datetime(2025, 3, 1, tzinfo=zone(validate_timezone('Asia/Kathmandu'))).isoformat())"
    )
    env = {**os.environ, "PYTHONTZPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2025-03-01T00:00:00+05:45"


def test_a_stored_zone_this_machine_does_not_know_is_a_typed_error() -> None:
    with pytest.raises(InvalidTimezoneError, match="not in this machine's zone database"):
        zone("Mars/Olympus")
    with pytest.raises(InvalidTimezoneError):
        zone("../etc/passwd")
