"""`billing tenants set ID [--timezone ZONE] [--name NAME]` and `billing tenants list`."""

from __future__ import annotations

import argparse
import sys

from billing import tenants
from billing.db import make_engine, make_session_factory
from billing.errors import InvalidTimezoneError, InvalidUsageError, TimezoneLockedError
from billing.settings import BillingSettings
from webhooks.output import print_rows
from webhooks.safetext import safe_text

COLUMNS = ["id", "name", "timezone", "created"]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `tenants` command group to the `billing` command line."""
    group = commands.add_parser("tenants", help="tenants' names and time zones")
    sub = group.add_subparsers(dest="tenants_command", required=True, metavar="TENANTS_COMMAND")

    setter = sub.add_parser("set", help="create a tenant's row or change its name or time zone")
    setter.add_argument("tenant_id")
    setter.add_argument("--timezone", help="an IANA zone, e.g. America/New_York (default UTC)")
    setter.add_argument("--name", help="a display name (default: the id)")
    setter.set_defaults(handler=_set)

    listing = sub.add_parser("list", help="tenants that have a row (others are on UTC)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)


def _set(args: argparse.Namespace) -> int:
    engine = make_engine(BillingSettings().database_url)
    try:
        with make_session_factory(engine).begin() as session:
            info = tenants.set_tenant(
                session, args.tenant_id, name=args.name, timezone=args.timezone
            )
    except (InvalidUsageError, InvalidTimezoneError, TimezoneLockedError) as error:
        print(f"billing tenants set: {safe_text(error)}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(f"tenant {safe_text(info.id)} ({safe_text(info.name)}) is billed in {info.timezone}")
    return 0


def _list(args: argparse.Namespace) -> int:
    engine = make_engine(BillingSettings().database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = [
                {
                    "id": info.id,
                    "name": info.name,
                    "timezone": info.timezone,
                    "created": info.created_at,
                }
                for info in tenants.list_tenants(session)
            ]
    finally:
        engine.dispose()
    print_rows(COLUMNS, rows, as_json=args.json)
    return 0
