"""`SqlDeliveryStore`: how relays claim and settle deliveries in SQL.

A claim is one short transaction: `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)`
counts the attempt and pushes `next_attempt_at` out by a lease, so relays running side by side
never pick the same row, and no transaction stays open while HTTP requests are in flight. A relay
that dies mid-batch loses nothing: its claimed rows fall due again when the lease ends (a delivery
may then be sent twice, with the same `webhook-id`). Outcomes are written only if the row still
carries the attempt number that was claimed, so a stale relay cannot overwrite a newer state.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Row, Select, Table, bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from webhooks.delivery import ClaimedDelivery
from webhooks.interfaces import AttemptResult
from webhooks.models import FAILED, PENDING, WebhookDelivery, WebhookEvent, WebhookSubscription
from webhooks.policy import failure_streak
from webhooks.secrets import active_secrets

_CLAIMABLE = (PENDING, FAILED)
# Spelled as the partial index `ix_webhook_deliveries_due` is, with constants rather than bound
# parameters, so PostgreSQL can prove the index applies even to a prepared statement's plan.
_DUE = text("webhook_deliveries.status IN ('pending', 'failed')")
_deliveries = cast(Table, WebhookDelivery.__table__)


class SqlDeliveryStore:
    """Deliveries in the `webhook_deliveries` table; each call is its own transaction."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def claim(self, limit: int, now: datetime, lease: timedelta) -> list[ClaimedDelivery]:
        """Reserve up to `limit` due deliveries of enabled subscriptions until `now + lease`."""
        due = (
            select(WebhookDelivery.id)
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(
                _DUE,
                WebhookDelivery.next_attempt_at <= now,
                WebhookSubscription.enabled.is_(True),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        )
        claim = (
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(due.scalar_subquery()))
            .values(
                attempts=WebhookDelivery.attempts + 1,
                next_attempt_at=now + lease,
                updated_at=now,
            )
            .returning(WebhookDelivery.id)
            .execution_options(synchronize_session=False)
        )
        with self._sessions.begin() as session:
            ids = list(session.scalars(claim))
            if not ids:
                return []
            rows = session.execute(_details().where(WebhookDelivery.id.in_(ids))).all()
        return [_claimed(row, now) for row in rows]

    def record(
        self, results: Sequence[AttemptResult], now: datetime, disable_after: timedelta
    ) -> None:
        """Store each attempt's decision and the subscriptions' failure streaks."""
        if not results:
            return
        settle = (
            _deliveries.update()
            .where(
                _deliveries.c.id == bindparam("b_id"),
                _deliveries.c.attempts == bindparam("b_attempt"),
            )
            .values(
                status=bindparam("b_status"),
                next_attempt_at=bindparam("b_next"),
                last_status_code=bindparam("b_code"),
                last_error=bindparam("b_error"),
                delivered_at=bindparam("b_delivered"),
                updated_at=now,
            )
        )
        params = [
            {
                "b_id": r.delivery.delivery_id,
                "b_attempt": r.delivery.attempt,
                "b_status": r.decision.status,
                "b_next": r.decision.next_attempt_at,
                "b_code": r.decision.last_status_code,
                "b_error": r.decision.last_error,
                "b_delivered": r.decision.delivered_at,
            }
            for r in results
        ]
        with self._sessions.begin() as session:
            session.execute(settle, params)
            _update_streaks(session, results, now, disable_after)

    def release(self, deliveries: Sequence[ClaimedDelivery], now: datetime) -> None:
        """Hand back claimed, unattempted deliveries, due now and uncounted."""
        if not deliveries:
            return
        unclaim = (
            _deliveries.update()
            .where(
                _deliveries.c.id == bindparam("b_id"),
                _deliveries.c.attempts == bindparam("b_attempt"),
                # Not `IN (...)`: expanding parameters cannot go through executemany.
                or_(_deliveries.c.status == PENDING, _deliveries.c.status == FAILED),
            )
            .values(attempts=_deliveries.c.attempts - 1, next_attempt_at=now, updated_at=now)
        )
        params = [{"b_id": d.delivery_id, "b_attempt": d.attempt} for d in deliveries]
        with self._sessions.begin() as session:
            session.execute(unclaim, params)

    def next_due(self, now: datetime) -> datetime | None:
        """When the earliest unclaimed delivery of an enabled subscription falls due."""
        query = (
            select(func.min(WebhookDelivery.next_attempt_at))
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .where(
                WebhookDelivery.status.in_(_CLAIMABLE),
                WebhookSubscription.enabled.is_(True),
            )
        )
        with self._sessions() as session:
            return session.execute(query).scalar()


def _details() -> Select[Any]:
    return (
        select(
            WebhookDelivery.id,
            WebhookDelivery.attempts,
            WebhookEvent.id,
            WebhookEvent.topic,
            WebhookEvent.payload,
            WebhookEvent.created_at,
            WebhookEvent.tenant_id,
            WebhookSubscription.id,
            WebhookSubscription.url,
            WebhookSubscription.secret,
            WebhookSubscription.previous_secret,
            WebhookSubscription.previous_secret_expires_at,
        )
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
        .order_by(WebhookDelivery.next_attempt_at, WebhookEvent.created_at)
    )


def _claimed(row: Row[Any], now: datetime) -> ClaimedDelivery:
    (delivery_id, attempts, event_id, topic, payload, created_at, tenant_id, *subscription) = tuple(
        row
    )
    (sub_id, url, secret, previous_secret, previous_expires_at) = subscription
    return ClaimedDelivery(
        delivery_id=delivery_id,
        event_id=event_id,
        topic=topic,
        payload=payload,
        event_created_at=created_at,
        subscription_id=sub_id,
        url=url,
        secrets=tuple(active_secrets(secret, previous_secret, previous_expires_at, now)),
        attempt=attempts,
        tenant_id=tenant_id,
    )


def _update_streaks(
    session: Session, results: Sequence[AttemptResult], now: datetime, disable_after: timedelta
) -> None:
    """Start, extend or end each subscription's failure streak; disable the ones to disable."""
    ids = sorted({r.delivery.subscription_id for r in results})
    query = select(WebhookSubscription.id, WebhookSubscription.failing_since).where(
        WebhookSubscription.id.in_(ids)
    )
    current: dict[str, datetime | None] = {sid: since for sid, since in session.execute(query)}
    streaks: dict[str, datetime | None] = dict(current)
    reasons: dict[str, str] = {}
    for result in results:
        sid = result.delivery.subscription_id
        streak = failure_streak(streaks.get(sid), result.outcome, now, disable_after)
        streaks[sid] = streak.failing_since
        if streak.disable_reason and sid not in reasons:
            reasons[sid] = streak.disable_reason
    for sid in ids:
        if sid in reasons:
            session.execute(
                update(WebhookSubscription)
                .where(WebhookSubscription.id == sid, WebhookSubscription.enabled.is_(True))
                .values(
                    enabled=False,
                    disabled_reason=reasons[sid],
                    failing_since=streaks[sid],
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        elif streaks.get(sid) != current.get(sid):
            session.execute(
                update(WebhookSubscription)
                .where(WebhookSubscription.id == sid)
                .values(failing_since=streaks[sid], updated_at=now)
                .execution_options(synchronize_session=False)
            )
