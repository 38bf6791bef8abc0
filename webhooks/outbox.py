"""Publishing into the transactional outbox.

`publish` writes an event and one `pending` delivery per matching subscription with the caller's
session, so the event commits, or rolls back, with the change it announces. It never commits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Select, func, insert, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from webhooks.errors import InvalidEventError
from webhooks.models import (
    EVENT_ID_MAX,
    PENDING,
    WebhookDelivery,
    WebhookEvent,
    WebhookSubscription,
)
from webhooks.sqltypes import new_id, utcnow

#: The PostgreSQL channel a relay LISTENs on; `publish` notifies it (delivered at commit).
NOTIFY_CHANNEL = "webhooks_outbox"

_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,199}")
_EVENT_ID = re.compile(rf"[\x21-\x7e]{{1,{EVENT_ID_MAX}}}")


def publish(
    session: Session, topic: str, payload: Mapping[str, Any], *, event_id: str | None = None
) -> str:
    """Store an event and its deliveries in the caller's transaction; return the event id.

    One delivery is written per enabled subscription of `topic` whose tenant filter is empty or
    equals `payload["tenant_id"]`. An event nobody subscribes to is kept for a later replay. The
    same `event_id` published twice (even concurrently, on PostgreSQL) is stored once, and the
    second call returns the id without writing anything.

    Raises:
        InvalidEventError: the topic or event id is malformed, or the payload is not a JSON
            object; nothing is stored.
    """
    check_topic(topic)
    event_id = new_id() if event_id is None else check_event_id(event_id)
    body = _json_object(payload)
    tenant_id = body.get("tenant_id")
    tenant = tenant_id if isinstance(tenant_id, str) else None
    row = {
        "id": event_id,
        "topic": topic,
        "tenant_id": tenant,
        "payload": body,
        "created_at": utcnow(),
    }
    if not _insert_event(session, row):
        return event_id
    subscription_ids = session.execute(matching_subscriptions(topic, tenant)).scalars().all()
    if subscription_ids:
        now = row["created_at"]
        session.execute(
            insert(WebhookDelivery),
            [
                {
                    "id": new_id(),
                    "event_id": event_id,
                    "subscription_id": sid,
                    "status": PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for sid in subscription_ids
            ],
        )
        notify_relays(session)
    return event_id


def matching_subscriptions(topic: str, tenant_id: str | None) -> Select[str]:
    """Ids of the enabled subscriptions that receive `topic` events of `tenant_id`."""
    tenant_filter: ColumnElement[bool] = WebhookSubscription.tenant_id.is_(None)
    if tenant_id is not None:
        tenant_filter = or_(tenant_filter, WebhookSubscription.tenant_id == tenant_id)
    return (
        select(WebhookSubscription.id)
        .where(
            WebhookSubscription.topic == topic,
            WebhookSubscription.enabled.is_(True),
            tenant_filter,
        )
        .order_by(WebhookSubscription.created_at, WebhookSubscription.id)
    )


def notify_relays(session: Session) -> None:
    """On PostgreSQL, wake the relays when this transaction commits (no-op elsewhere)."""
    if session.get_bind().dialect.name == "postgresql":
        # Identical notifications of one transaction are folded into one by PostgreSQL.
        session.execute(select(func.pg_notify(literal(NOTIFY_CHANNEL), literal(""))))


def check_topic(topic: str) -> str:
    """Return `topic` if it is a dotted name of letters, digits, `_ . : -` (at most 200)."""
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
        raise InvalidEventError(f"invalid topic {topic!r}: use letters, digits and . _ : -")
    return topic


def check_event_id(event_id: str) -> str:
    """Return `event_id` if it can travel as the `webhook-id` header (printable, no spaces)."""
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise InvalidEventError(
            f"invalid event id {event_id!r}: 1 to {EVENT_ID_MAX} printable ASCII characters"
        )
    return event_id


def _json_object(payload: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise InvalidEventError(f"payload must be a JSON object, got {type(payload).__name__}")
    try:
        parsed = json.loads(json.dumps(dict(payload), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InvalidEventError(f"payload is not JSON-serialisable: {error}") from error
    if not isinstance(parsed, dict):  # pragma: no cover - a dict always dumps to an object
        raise InvalidEventError("payload must be a JSON object")
    return parsed


def _insert_event(session: Session, row: dict[str, Any]) -> bool:
    """Insert the event unless its id exists; True if this call inserted it."""
    dialect = session.get_bind().dialect.name
    stmt: Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(WebhookEvent).on_conflict_do_nothing(index_elements=["id"])
    elif dialect == "sqlite":
        stmt = sqlite.insert(WebhookEvent).on_conflict_do_nothing(index_elements=["id"])
    else:
        return _insert_event_portably(session, row)
    inserted = session.execute(stmt.values(row).returning(WebhookEvent.id)).first()
    return inserted is not None


def _insert_event_portably(session: Session, row: dict[str, Any]) -> bool:
    if session.get(WebhookEvent, row["id"]) is not None:
        return False
    try:
        with session.begin_nested():
            session.execute(insert(WebhookEvent).values(row))
    except IntegrityError:
        return False
    return True
