"""`billing webhooks …`: manage subscriptions, inspect and replay deliveries, run a test receiver.

```
billing webhooks add TOPIC… URL [--tenant T] [SECRET] one subscription per topic, one
                                                        secret; prints ids and secret once
billing webhooks list [--json]
billing webhooks disable SUBSCRIPTION [--reason TEXT]
billing webhooks enable SUBSCRIPTION
billing webhooks rotate-secret SUBSCRIPTION [--grace 24h]  prints the new secret
billing webhooks deliveries [--status dead] [--subscription S] [--limit N] [--json]
billing webhooks replay EVENT_ID | --since TIME [--subscription S]
billing webhooks encrypt-secrets                           with the first WEBHOOKS_SECRET_KEY
billing webhooks prune [--older-than 30d]                  delete what retention would
billing webhooks listen SECRET… [--port P]                 verify and print each delivery
```

SECRET is `--secret S`, `--secret-file PATH` (one secret per line, `-` for stdin) or
`--secret-env NAME` (the variable holding it): a secret on the command line is visible to every
user of the machine (`ps`), a file or the environment is not. `listen` takes several while a
secret rotates.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from webhooks.db import make_engine
from webhooks.encryption import encrypt_all
from webhooks.errors import InvalidSubscriptionError, WebhookError
from webhooks.models import STATUSES, WebhookDelivery, WebhookEvent
from webhooks.output import print_rows
from webhooks.replay import replay
from webhooks.retention import prune
from webhooks.safetext import safe_text
from webhooks.secrets import check_secret
from webhooks.settings import WebhookSettings, parse_duration
from webhooks.sqltypes import utcnow
from webhooks.subscriptions import SqlWebhookSubscriptions

DEFAULT_LISTEN_PORT = 8787


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `webhooks` command group to the `billing` command line."""
    group = commands.add_parser("webhooks", help="webhook subscriptions and deliveries")
    sub = group.add_subparsers(dest="webhooks_command", required=True, metavar="WEBHOOKS_COMMAND")

    add = sub.add_parser("add", help="subscribe a URL to topics under one secret (printed once)")
    add.add_argument("topics", nargs="+", metavar="TOPIC", help="one or more topics")
    add.add_argument("url")
    add.add_argument("--tenant", help="only this tenant's events")
    _secret_options(add, "a whsec_… secret to use instead of a generated one")
    add.set_defaults(handler=_handled(_add))

    listing = sub.add_parser("list", help="every subscription (a table; --json for machines)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_handled(_list))

    disable = sub.add_parser("disable", help="stop deliveries to a subscription")
    disable.add_argument("subscription")
    disable.add_argument("--reason", default="disabled by an operator")
    disable.set_defaults(handler=_handled(_disable))

    enable = sub.add_parser("enable", help="resume deliveries to a subscription")
    enable.add_argument("subscription")
    enable.set_defaults(handler=_handled(_enable))

    rotate = sub.add_parser("rotate-secret", help="new secret; the old one signs for a grace time")
    rotate.add_argument("subscription")
    rotate.add_argument("--grace", type=parse_duration, help="e.g. 24h (default: the setting)")
    rotate.set_defaults(handler=_handled(_rotate))

    deliveries = sub.add_parser("deliveries", help="recent deliveries, newest first")
    deliveries.add_argument("--status", choices=STATUSES)
    deliveries.add_argument("--subscription")
    deliveries.add_argument("--limit", type=int, default=50)
    deliveries.add_argument("--json", action="store_true", help="one JSON object per line")
    deliveries.set_defaults(handler=_handled(_deliveries))

    again = sub.add_parser("replay", help="send an event, or every event since a time, again")
    what = again.add_mutually_exclusive_group(required=True)
    what.add_argument("event_id", nargs="?")
    what.add_argument("--since", type=_parse_since, help="ISO 8601 time with offset, or 2h ago")
    again.add_argument("--subscription", help="only to this subscription")
    again.set_defaults(handler=_handled(_replay))

    encrypt = sub.add_parser(
        "encrypt-secrets", help="encrypt stored secrets with the first WEBHOOKS_SECRET_KEY"
    )
    encrypt.set_defaults(handler=_handled(_encrypt))

    prune = sub.add_parser("prune", help="delete delivered deliveries and old events now")
    prune.add_argument(
        "--older-than", type=parse_duration, help="e.g. 30d (default: WEBHOOKS_RETENTION)"
    )
    prune.set_defaults(handler=_prune)

    listen = sub.add_parser("listen", help="a local receiver that verifies and prints deliveries")
    _secret_options(listen, "a secret to verify with; repeat while rotating")
    listen.add_argument("--port", type=int, default=DEFAULT_LISTEN_PORT)
    listen.add_argument("--host", default="127.0.0.1")
    listen.set_defaults(handler=_listen, database=None)


def _secret_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--secret", action="append", default=[], help=f"{what} (visible in ps)")
    parser.add_argument(
        "--secret-file",
        action="append",
        default=[],
        type=argparse.FileType("r", encoding="utf-8"),
        help="a file holding the secret, one per line ('-': stdin)",
    )
    parser.add_argument(
        "--secret-env", action="append", default=[], help="the environment variable holding it"
    )


def read_secrets(args: argparse.Namespace) -> list[str]:
    """The secrets given by `--secret`, `--secret-file` and `--secret-env`, each checked.

    Raises:
        InvalidSubscriptionError: a variable is unset, a file holds no secret, a secret is
            malformed or shorter than 24 bytes.
    """
    found = list(args.secret)
    for file in args.secret_file:
        with file:
            lines = [line.strip() for line in file]
        if not any(lines):
            raise InvalidSubscriptionError(f"{file.name} holds no secret")
        found += [line for line in lines if line]
    for name in args.secret_env:
        value = os.environ.get(name, "").strip()
        if not value:
            raise InvalidSubscriptionError(f"the environment variable {name} holds no secret")
        found.append(value)
    return [check_secret(secret) for secret in found]


def _handled(
    command: Callable[[argparse.Namespace, Session, WebhookSettings], int],
) -> Callable[[argparse.Namespace], int]:
    """Run `command` in one transaction; a `WebhookError` is printed and exits 1 (database
    failures are the `billing` command line's to explain)."""

    def handler(args: argparse.Namespace) -> int:
        settings = WebhookSettings()
        try:
            with _session(settings) as session:
                return command(args, session, settings)
        except WebhookError as error:
            _print_error(error)
            return 1

    return handler


@contextmanager
def _session(settings: WebhookSettings) -> Iterator[Session]:
    engine = make_engine(settings.database_url)
    try:
        with sessionmaker(engine, expire_on_commit=False).begin() as session:
            yield session
    finally:
        engine.dispose()


def _add(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    given = read_secrets(args)
    if len(given) > 1:
        raise InvalidSubscriptionError("give one secret, or none to have one generated")
    secret = given[0] if given else None
    subscriptions = SqlWebhookSubscriptions(session, box=settings.secret_box())
    for topic in dict.fromkeys(args.topics):
        sub = subscriptions.add(topic, args.url, secret, tenant_id=args.tenant)
        secret = subscriptions.secret_of(sub)  # the next topics share the first one's secret
        print(f"subscription {sub.id} {safe_text(topic)}")
    print(f"secret {secret}")
    print("keep the secret now: it is not shown again", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    rows = [
        {
            "id": sub.id,
            "topic": sub.topic,
            "url": sub.url,
            "tenant_id": sub.tenant_id,
            "enabled": sub.enabled,
            "disabled_reason": sub.disabled_reason,
            "failing_since": sub.failing_since,
            "created_at": sub.created_at,
        }
        for sub in SqlWebhookSubscriptions(session).all()
    ]
    print_rows(SUBSCRIPTION_COLUMNS, rows, as_json=args.json)
    return 0


SUBSCRIPTION_COLUMNS = [
    "id",
    "topic",
    "url",
    "tenant_id",
    "enabled",
    "disabled_reason",
    "failing_since",
    "created_at",
]


def _disable(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    SqlWebhookSubscriptions(session).disable(args.subscription, args.reason)
    print(f"subscription {safe_text(args.subscription)} disabled")
    return 0


def _enable(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    SqlWebhookSubscriptions(session).enable(args.subscription)
    print(f"subscription {safe_text(args.subscription)} enabled")
    return 0


def _rotate(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    grace: timedelta = args.grace or settings.secret_grace
    subs = SqlWebhookSubscriptions(session, box=settings.secret_box())
    secret = subs.rotate_secret(args.subscription, grace=grace)
    print(f"secret {secret}")
    print(f"the previous secret keeps signing until {_iso(utcnow() + grace)}", file=sys.stderr)
    return 0


def _deliveries(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    query = (
        select(WebhookDelivery, WebhookEvent.topic)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(args.limit)
    )
    if args.status:
        query = query.where(WebhookDelivery.status == args.status)
    if args.subscription:
        query = query.where(WebhookDelivery.subscription_id == args.subscription)
    rows = [
        {
            "id": delivery.id,
            "event_id": delivery.event_id,
            "topic": topic,
            "subscription_id": delivery.subscription_id,
            "status": delivery.status,
            "attempts": delivery.attempts,
            "next_attempt_at": delivery.next_attempt_at,
            "last_status_code": delivery.last_status_code,
            "last_error": delivery.last_error,
            "delivered_at": delivery.delivered_at,
        }
        for delivery, topic in session.execute(query)
    ]
    print_rows(DELIVERY_COLUMNS, rows, as_json=args.json)
    return 0


DELIVERY_COLUMNS = [
    "id",
    "event_id",
    "topic",
    "subscription_id",
    "status",
    "attempts",
    "next_attempt_at",
    "last_status_code",
    "last_error",
    "delivered_at",
]


def _replay(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    count = replay(
        session, event_id=args.event_id, since=args.since, subscription_id=args.subscription
    )
    print(f"{count} deliveries queued")
    return 0


def _encrypt(args: argparse.Namespace, session: Session, settings: WebhookSettings) -> int:
    box = settings.secret_box()
    if box is None:
        print("error: set WEBHOOKS_SECRET_KEY first", file=sys.stderr)
        return 1
    print(f"{encrypt_all(session, box)} subscriptions' secrets encrypted with the first key")
    return 0


def _prune(args: argparse.Namespace) -> int:
    settings = WebhookSettings()
    retention: timedelta = args.older_than or settings.retention
    if not retention:
        print("WEBHOOKS_RETENTION is 0: everything is kept (give --older-than to prune)")
        return 0
    engine = make_engine(settings.database_url)
    try:
        pruned = prune(sessionmaker(engine), utcnow(), retention)
    finally:
        engine.dispose()
    print(f"{pruned.deliveries} delivered deliveries and {pruned.events} events deleted")
    return 0


def _listen(args: argparse.Namespace) -> int:
    import uvicorn

    from webhooks.listen import make_listen_app

    try:
        secrets = read_secrets(args)
    except WebhookError as error:
        _print_error(error)
        return 1
    if not secrets:
        print("error: give --secret, --secret-file or --secret-env", file=sys.stderr)
        return 2
    app = make_listen_app(secrets)
    print(f"listening on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _parse_since(text: str) -> datetime:
    """An aware ISO 8601 time, or a duration meaning that long ago (`2h`)."""
    try:
        return utcnow() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from error
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. {text}+00:00")
    return moment


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _print_error(error: Exception) -> None:
    print(f"error: {type(error).__name__}: {safe_text(error)}", file=sys.stderr)
