"""The `billing` command line.

Each package adds its own command groups with an `add_commands(subparsers)` function; this module
only composes them, reads the settings from the environment once, and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from billing.api.cli import add_commands as add_key_commands
from billing.db import make_engine
from billing.migrate import upgrade
from billing.settings import BillingSettings
from webhooks.cli import add_commands as add_webhook_commands
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
    add_worker_commands(commands)
    add_invoice_commands(commands)
    add_webhook_commands(commands)
    return parser


def _add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    up = db_commands.add_parser("upgrade", help="apply the migrations (run before each deploy)")
    up.set_defaults(handler=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    settings = BillingSettings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    print(f"database at {engine.url.render_as_string(hide_password=True)} is up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `billing` console script."""
    configure_logging(LogSettings())
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
