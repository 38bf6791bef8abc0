"""`billing catalog apply FILE [--dry-run]` and `billing catalog export [FILE]` (see
`billing.catalog`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy import Engine

from billing import catalog
from billing.db import make_engine, make_session_factory
from billing.errors import CatalogError, PriceDefinitionError
from billing.settings import BillingSettings
from webhooks.safetext import safe_text
from webhooks.sqltypes import utcnow


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `catalog` command group to the `billing` command line."""
    group = commands.add_parser("catalog", help="plans, prices and entitlements as a YAML file")
    sub = group.add_subparsers(dest="catalog_command", required=True, metavar="CATALOG_COMMAND")

    apply = sub.add_parser(
        "apply", help="make the database's catalogue what the file declares (idempotent)"
    )
    apply.add_argument("file", type=Path, help="the catalogue, e.g. catalog.yaml")
    apply.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    apply.set_defaults(handler=_apply)

    export = sub.add_parser("export", help="write the database's catalogue as YAML")
    export.add_argument("file", type=Path, nargs="?", help="where to write (default: stdout)")
    export.set_defaults(handler=_export)


def _apply(args: argparse.Namespace) -> int:
    source = str(args.file)
    try:
        text = args.file.read_text(encoding="utf-8")
        wanted = catalog.load_catalog(text, source)
    except (OSError, UnicodeDecodeError) as error:
        print(f"billing catalog: cannot read {safe_text(source)}: {error}", file=sys.stderr)
        return 2
    except CatalogError as error:
        print(f"billing catalog: {safe_text(error)}", file=sys.stderr)
        return 2
    engine = make_engine(BillingSettings().database_url)
    try:
        made = _plan_and_apply(engine, wanted, source, dry_run=args.dry_run)
    except PriceDefinitionError as error:  # a rule that the database's other rows decide
        print(f"billing catalog: {safe_text(source)}: {safe_text(error)}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if made is None:
        return 0
    if made:
        print(f"{safe_text(source)}: {len(made)} changes applied")
    else:
        print(f"{safe_text(source)}: no changes")
    return 0


def _plan_and_apply(
    engine: Engine, wanted: catalog.Catalog, source: str, *, dry_run: bool
) -> list[catalog.Change] | None:
    """Print the changes and make them in one transaction; return them (None: a dry run)."""
    with make_session_factory(engine).begin() as session:
        changes = catalog.plan_changes(session, wanted, now=utcnow())
        for change in changes:
            print(safe_text(change.describe()))
        made = [c for c in changes if c.action != "absent"]
        if dry_run:
            session.rollback()
            print(f"{safe_text(source)}: {len(made)} changes (dry run: none made)")
            return None
        catalog.apply_changes(session, made)
    return made


def _export(args: argparse.Namespace) -> int:
    engine = make_engine(BillingSettings().database_url)
    try:
        with make_session_factory(engine)() as session:
            document = catalog.export_catalog(session)
    finally:
        engine.dispose()
    if args.file is None:
        sys.stdout.write(document)
    else:
        args.file.write_text(document, encoding="utf-8")
        print(f"wrote {safe_text(args.file)}", file=sys.stderr)
    return 0
