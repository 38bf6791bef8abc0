"""Replay: send stored events again, to the subscriptions that receive them now.

A replayed delivery restarts from attempt 1, out of any claim, whatever its state (`dead`,
`delivered`, `failed`, claimed), and one is created for a subscription added after the event.
Receivers see the same `webhook-id` again and drop it if they already have it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from webhooks.errors import EventNotFoundError, SubscriptionNotFoundError
from webhooks.models import PENDING, WebhookDelivery, WebhookEvent, WebhookSubscription
from webhooks.outbox import notify_relays
from webhooks.sqltypes import new_id, utcnow
from webhooks.subscriptions import matching_subscriptions


def replay(
    session: Session,
    *,
    event_id: str | None = None,
    since: datetime | None = None,
    subscription_id: str | None = None,
    now: Callable[[], datetime] = utcnow,
) -> int:
    """Queue one event (`event_id`) or every event created at or after `since` again.

    Each goes to the enabled subscriptions of its topic and tenant, or only to
    `subscription_id`. Returns how many deliveries were queued. Does not commit.

    Raises:
        EventNotFoundError: no event has `event_id`.
        SubscriptionNotFoundError: no subscription has `subscription_id`.
        ValueError: neither or both of `event_id` and `since` were given.
    """
    if (event_id is None) == (since is None):
        raise ValueError("give an event id or a time to replay from, not both")
    if subscription_id is not None and session.get(WebhookSubscription, subscription_id) is None:
        raise SubscriptionNotFoundError(subscription_id)
    query = select(WebhookEvent.id, WebhookEvent.topic, WebhookEvent.tenant_id)
    if event_id is not None:
        events = session.execute(query.where(WebhookEvent.id == event_id)).all()
        if not events:
            raise EventNotFoundError(event_id)
    else:
        events = session.execute(
            query.where(WebhookEvent.created_at >= since).order_by(WebhookEvent.created_at)
        ).all()
    at = now()
    queued = 0
    for eid, topic, tenant_id in events:
        targets = matching_subscriptions(topic, tenant_id)
        if subscription_id is not None:
            targets = targets.where(WebhookSubscription.id == subscription_id)
        for sid in session.scalars(targets):
            _requeue(session, eid, sid, at)
            queued += 1
    if queued:
        notify_relays(session)
    return queued


def _requeue(session: Session, event_id: str, subscription_id: str, at: datetime) -> None:
    fresh: dict[str, Any] = {
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": at,
        "last_status_code": None,
        "last_error": None,
        "delivered_at": None,
        # Out of any claim: a claim still counting it would hold its subscription's slot (and,
        # at the cap, the replay itself) until the lease ran out.
        "claimed_until": None,
        "slot": None,
        "updated_at": at,
    }
    row = {
        "id": new_id(),
        "event_id": event_id,
        "subscription_id": subscription_id,
        "created_at": at,
        **fresh,
    }
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(WebhookDelivery).values(row)
        session.execute(
            stmt.on_conflict_do_update(index_elements=["event_id", "subscription_id"], set_=fresh)
        )
        return
    existing = session.scalar(
        select(WebhookDelivery).where(
            WebhookDelivery.event_id == event_id,
            WebhookDelivery.subscription_id == subscription_id,
        )
    )
    if existing is None:
        session.add(WebhookDelivery(**row))
    else:
        for name, value in fresh.items():
            setattr(existing, name, value)
    session.flush()
