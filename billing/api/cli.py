"""`billing keys create | revoke | list`: manage the API's bearer keys (no FastAPI needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from billing.api import keys
from billing.api.keycache import RedisRevocationMarker
from billing.db import make_engine, make_session_factory
from billing.errors import InvalidUsageError
from billing.settings import BillingSettings
from webhooks.output import print_rows
from webhooks.safetext import safe_text


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `keys` command group to the `billing` command line."""
    group = commands.add_parser("keys", help="API keys of the HTTP API")
    sub = group.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")

    create = sub.add_parser("create", help="create a key and print it (shown only once)")
    owner = create.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", help="the tenant the key acts for (billing.read, .write)")
    owner.add_argument(
        "--operator",
        action="store_true",
        help="a key bound to no tenant (billing.admin: plans, prices, any tenant's "
        "subscriptions and invoices)",
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=keys.SCOPES,
        help="a scope to grant (repeat for several)",
    )
    create.add_argument("--name", help="a label to recognise the key by")
    create.set_defaults(handler=_create)

    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_revoke)

    listing = sub.add_parser("list", help="list keys (id, prefix, tenant, scopes, state)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)


@contextmanager
def _transaction() -> Iterator[Session]:
    """A session in one transaction on `DATABASE_URL`; the engine is closed afterwards."""
    engine = make_engine(BillingSettings().database_url)
    try:
        with make_session_factory(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


def _create(args: argparse.Namespace) -> int:
    try:
        with _transaction() as session:
            key, plaintext = keys.create_key(
                session,
                tenant_id=args.tenant,
                operator=args.operator,
                scopes=args.scope,
                name=args.name,
            )
            key_id = key.id
    except InvalidUsageError as error:
        print(f"billing keys create: {error}", file=sys.stderr)
        return 2
    print(plaintext)
    owner = "operator key" if args.operator else f"key for tenant {safe_text(args.tenant)}"
    print(
        f"{owner} {key_id} ({', '.join(sorted(set(args.scope)))}); "
        "store it now, it is not shown again",
        file=sys.stderr,
    )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _transaction() as session:
        key = keys.revoke_key(session, args.key_id)
    if key is None:
        print(f"billing keys revoke: no key with id {safe_text(args.key_id)}", file=sys.stderr)
        return 1
    print(f"key {key.id} revoked")
    _tell_web_processes(BillingSettings())
    return 0


def _tell_web_processes(settings: BillingSettings) -> None:
    """Change the revocation marker, so web processes caching keys read them again."""
    if not settings.redis_url:
        return
    try:
        with Redis.from_url(settings.redis_url) as client:
            RedisRevocationMarker(client, settings.broker_namespace).bump()
    except RedisError as error:
        print(
            f"billing keys revoke: Redis did not answer ({type(error).__name__}); web processes "
            "that cache API keys accept this one for up to API_KEY_CACHE_TTL more",
            file=sys.stderr,
        )


def _list(args: argparse.Namespace) -> int:
    with _transaction() as session:
        rows = [
            {
                "id": key.id,
                "prefix": f"{key.prefix}…",
                "tenant": "(operator)" if key.tenant_id is None else key.tenant_id,
                "scopes": key.scopes,
                "state": "revoked" if key.revoked_at else "active",
                "name": key.name,
                "created": key.created_at,
            }
            for key in keys.list_keys(session, args.tenant)
        ]
    print_rows(COLUMNS, rows, as_json=args.json)
    return 0


COLUMNS = ["id", "prefix", "tenant", "scopes", "state", "name", "created"]
