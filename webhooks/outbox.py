"""The SQL outbox, and `publish`: events written in the caller's transaction.

`publish(session, ...)` writes the event and one `pending` delivery per matching subscription
with the caller's session, so the event commits, or rolls back, with the change it announces.
It never commits. On PostgreSQL it also notifies `NOTIFY_CHANNEL`, which PostgreSQL delivers at
commit, so an idle relay wakes at once; there the event, its deliveries and the notification
are one statement, built once (`publishing_ctes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    Select,
    String,
    Text,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from webhooks.interfaces import NewEvent, Subscriber
from webhooks.models import PENDING, WebhookDelivery, WebhookEvent, WebhookSubscription
from webhooks.service import WebhookService, new_event
from webhooks.sqltypes import UTCDateTime, new_id, utcnow
from webhooks.subscriptions import matching_subscriptions, subscription_matches

#: The PostgreSQL channel relays LISTEN on.
NOTIFY_CHANNEL = "webhooks_outbox"
_NOTIFIED = "webhooks.notified_in"


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
    if session.get_bind().dialect.name == "postgresql":
        event = new_event(topic, payload, event_id, utcnow())
        session.execute(
            _PUBLISH,
            {
                "event_id": event.id,
                "event_topic": event.topic,
                "event_tenant_id": event.tenant_id,
                "event_payload": event.payload,
                "event_created_at": event.created_at,
            },
        )
        return event.id
    service = WebhookService(outbox=SqlOutboxStore(session), subs=_MatchingIds(session))
    return service.publish(topic, payload, event_id=event_id)


@dataclass(frozen=True)
class PublishingCtes:
    """`publish` as two data-modifying CTEs of one PostgreSQL statement (`publishing_ctes`)."""

    #: The events stored by this statement (`id`, `topic`, `tenant_id`, `created_at`); an id
    #: stored before is not among them.
    events: CTE
    #: Their pending deliveries (`id`), one per matching subscription.
    deliveries: CTE

    def notify(self) -> ColumnElement[str | None]:
        """A column that notifies `NOTIFY_CHANNEL` when a delivery was written (NULL if not)."""
        notify = cast(func.pg_notify(literal(NOTIFY_CHANNEL), literal("")), Text)
        return case((exists(select(self.deliveries.c.id)), notify))


def publishing_ctes(events: Select[*tuple[Any, ...]]) -> PublishingCtes:
    """On PostgreSQL, store in the caller's statement the events `events` selects, as `publish`
    does: each with a pending delivery per enabled subscription of its topic and tenant, an id
    stored before skipped (with no new delivery). The one round trip of the caller's statement
    replaces `publish`'s three or four.

    `events` selects `webhook_events`' columns in order: `id`, `topic`, `tenant_id`, `payload`
    (JSON), `created_at`; the caller validates them as `publish` would (`new_event`). The
    caller's statement must include both CTEs (`add_cte`) and select `notify()` so the relays
    wake at commit.
    """
    columns = ["id", "topic", "tenant_id", "payload", "created_at"]
    stored = (
        postgresql.insert(WebhookEvent)
        .from_select(columns, events)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(
            WebhookEvent.id, WebhookEvent.topic, WebhookEvent.tenant_id, WebhookEvent.created_at
        )
        .cte("published_events")
    )
    at = stored.c.created_at
    rows = select(
        cast(func.gen_random_uuid(), String),
        stored.c.id,
        WebhookSubscription.id,
        literal(PENDING),
        literal(0),
        at,
        at,
        at,
    ).where(subscription_matches(stored.c.topic, stored.c.tenant_id))
    deliveries = (
        insert(WebhookDelivery)
        .from_select(
            [
                "id",
                "event_id",
                "subscription_id",
                "status",
                "attempts",
                "next_attempt_at",
                "created_at",
                "updated_at",
            ],
            rows,
        )
        .returning(WebhookDelivery.id)
        .cte("published_deliveries")
    )
    return PublishingCtes(stored, deliveries)


def bound_event_row() -> Any:
    """A SELECT of one event's columns as bound parameters (`event_id`, `event_topic`,
    `event_tenant_id`, `event_payload`, `event_created_at`), for `publishing_ctes`."""
    return select(
        bindparam("event_id", type_=String()),
        bindparam("event_topic", type_=String()),
        bindparam("event_tenant_id", type_=String()),
        bindparam("event_payload", type_=postgresql.JSON()),
        bindparam("event_created_at", type_=UTCDateTime()),
    )


_PUBLISHED = publishing_ctes(bound_event_row())
#: PostgreSQL: `publish` in one round trip (the event, its deliveries, the notification).
_PUBLISH = select(_PUBLISHED.notify()).add_cte(_PUBLISHED.events, _PUBLISHED.deliveries)


@dataclass(frozen=True)
class _SubscriberRef:
    id: str


class _MatchingIds:
    """Matching subscriptions as bare ids: `publish` needs nothing else, and loads nothing else."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def matching(self, topic: str, tenant_id: str | None) -> list[_SubscriberRef]:
        query = matching_subscriptions(topic, tenant_id)
        return [_SubscriberRef(sid) for sid in self.session.scalars(query)]


class SqlOutboxStore:
    """The `webhook_events` and `webhook_deliveries` tables, through the caller's session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def append(self, event: NewEvent, subscribers: Sequence[Subscriber]) -> bool:
        """Store the event and a pending delivery per subscriber unless the id is stored."""
        if not self._insert_event(event):
            return False
        if subscribers:
            now = event.created_at
            rows = [
                {
                    "id": new_id(),
                    "event_id": event.id,
                    "subscription_id": sub.id,
                    "status": PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for sub in subscribers
            ]
            self.session.execute(insert(WebhookDelivery), rows)
            notify_relays(self.session)
        return True

    def _insert_event(self, event: NewEvent) -> bool:
        row = {
            "id": event.id,
            "topic": event.topic,
            "tenant_id": event.tenant_id,
            "payload": event.payload,
            "created_at": event.created_at,
        }
        dialect = self.session.get_bind().dialect.name
        stmt: Insert
        if dialect == "postgresql":
            stmt = postgresql.insert(WebhookEvent).on_conflict_do_nothing(index_elements=["id"])
        elif dialect == "sqlite":
            stmt = sqlite.insert(WebhookEvent).on_conflict_do_nothing(index_elements=["id"])
        else:
            return self._insert_event_portably(row)
        # A concurrent insert of the same id waits for the other transaction, then does nothing.
        inserted = self.session.execute(stmt.values(row).returning(WebhookEvent.id)).first()
        return inserted is not None

    def _insert_event_portably(self, row: dict[str, Any]) -> bool:
        if self.session.get(WebhookEvent, row["id"]) is not None:
            return False
        try:
            with self.session.begin_nested():
                self.session.execute(insert(WebhookEvent).values(row))
        except IntegrityError:
            return False
        return True


def notify_relays(session: Session) -> None:
    """On PostgreSQL, wake the relays when this transaction commits (no-op elsewhere).

    Once per transaction: PostgreSQL would fold repeats anyway, this saves the round trips.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    # The innermost transaction: a notification made in a savepoint that was rolled back is gone.
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is not None and session.info.get(_NOTIFIED) is transaction:
        return
    session.execute(select(func.pg_notify(literal(NOTIFY_CHANNEL), literal(""))))
    session.info[_NOTIFIED] = transaction
