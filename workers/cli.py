"""The `billing` command line.

Each package adds its own command groups with an `add_commands(subparsers)` function; this module
only composes them, reads the settings from the environment once, and dispatches. A command that
cannot work as configured (see `workers.clierrors`) prints one line and exits 2.

Commands open the database of `DATABASE_URL` (`WEBHOOKS_DATABASE_URL` for `webhooks`) and refuse
a SQLite file that does not exist, unless they set `database="create"` (`db upgrade`, `run`) or
`database=None` (no database: `jobs`, `demo`, `webhooks listen`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from billing.api.cli import add_commands as add_key_commands
from billing.catalog_cli import add_commands as add_catalog_commands
from billing.db import make_engine, redact_url
from billing.migrate import current_revision, upgrade
from billing.settings import BillingSettings
from billing.tenants_cli import add_commands as add_tenant_commands
from webhooks.cli import add_commands as add_webhook_commands
from webhooks.settings import WebhookSettings
from workers.clierrors import EXIT_UNUSABLE, check_database_exists, explain
from workers.commands import add_commands as add_worker_commands
from workers.invoice_commands import add_commands as add_invoice_commands
from workers.logs import configure_logging
from workers.settings import LogSettings


def build_parser() -> argparse.ArgumentParser:
    """The whole `billing` command tree."""
    parser = argparse.ArgumentParser(prog="billing", description="billing-workers")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_db_commands(commands)
    add_key_commands(commands)
    add_catalog_commands(commands)
    add_tenant_commands(commands)
    add_worker_commands(commands)
    add_invoice_commands(commands)
    add_webhook_commands(commands)
    return parser


def _add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    up = db_commands.add_parser("upgrade", help="apply the migrations (run before each deploy)")
    up.set_defaults(handler=_db_upgrade, database="create")


def _db_upgrade(args: argparse.Namespace) -> int:
    settings = BillingSettings()
    engine = make_engine(settings.database_url)
    try:
        applied = upgrade(engine)
        now_at = current_revision(engine)
    finally:
        engine.dispose()
    where = redact_url(settings.database_url)
    if applied:
        print(f"applied {', '.join(applied)}: the database at {where} is now at {now_at}")
    else:
        print(f"the database at {where} was already up to date at {now_at}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `billing` console script."""
    configure_logging(LogSettings())
    args = build_parser().parse_args(argv)
    database_url = _database_url(args)
    try:
        if getattr(args, "database", "existing") == "existing":
            check_database_exists(database_url)
        return int(args.handler(args))
    except Exception as error:
        line = explain(error, database_url=database_url)
        if line is None:
            raise
        print(f"billing {args.command}: {line}", file=sys.stderr)
        return EXIT_UNUSABLE


def _database_url(args: argparse.Namespace) -> str:
    if args.command == "webhooks":
        return WebhookSettings().database_url
    return BillingSettings().database_url


if __name__ == "__main__":
    sys.exit(main())
