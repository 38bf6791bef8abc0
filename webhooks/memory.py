"""`InMemoryOutboxStore`: the outbox and delivery queue in a process's memory.

For the embedded set-up and tests: it implements both the outbox (`append`) and the relay's
delivery store (`claim`, `record`, `release`, `next_due`), so a `Relay` can deliver from it.
Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from webhooks.delivery import ClaimedDelivery
from webhooks.interfaces import AttemptResult, NewEvent, Subscriber
from webhooks.models import DELIVERED, FAILED, PENDING
from webhooks.policy import failure_streak
from webhooks.secrets import active_secrets
from webhooks.sqltypes import new_id
from webhooks.store import fair_share
from webhooks.subscriptions import Subscription

_CLAIMABLE = (PENDING, FAILED)


@dataclass
class MemoryDelivery:
    """The state of one event's delivery to one in-memory subscription."""

    event: NewEvent
    subscription: Subscription
    next_attempt_at: datetime | None
    id: str = ""
    status: str = PENDING
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    claimed_until: datetime | None = None


class InMemoryOutboxStore:
    """Events and deliveries in dicts, guarded by a lock."""

    def __init__(self) -> None:
        self._events: dict[str, NewEvent] = {}
        self._deliveries: dict[str, MemoryDelivery] = {}
        self._lock = threading.Lock()

    def append(self, event: NewEvent, subscribers: Sequence[Subscriber]) -> bool:
        """Store the event and a pending delivery per subscriber unless the id is stored.

        Subscribers must be `Subscription`s of an `InMemoryWebhookSubscriptions`.
        """
        subs = [s for s in subscribers if isinstance(s, Subscription)]
        if len(subs) != len(subscribers):
            raise TypeError("InMemoryOutboxStore delivers to in-memory subscriptions only")
        with self._lock:
            if event.id in self._events:
                return False
            self._events[event.id] = event
            for sub in subs:
                delivery = MemoryDelivery(event, sub, event.created_at, id=new_id())
                self._deliveries[delivery.id] = delivery
        return True

    def events(self) -> list[NewEvent]:
        """Every stored event, oldest first."""
        return sorted(self._events.values(), key=lambda e: e.created_at)

    def deliveries(self) -> list[MemoryDelivery]:
        """Every delivery, in the order they were written."""
        return list(self._deliveries.values())

    def claim(
        self,
        limit: int,
        now: datetime,
        lease: timedelta,
        max_in_flight: int | None = None,
    ) -> list[ClaimedDelivery]:
        """Reserve up to `limit` due deliveries until `now + lease`, counting the attempt, at
        most `max_in_flight` of one subscription in flight; round-robin over subscriptions."""
        with self._lock:
            in_flight = Counter(
                d.subscription.id
                for d in self._deliveries.values()
                if d.status in _CLAIMABLE and d.claimed_until and d.claimed_until > now
            )
            due = sorted(
                (d for d in self._deliveries.values() if _is_due(d, now)),
                key=lambda d: d.next_attempt_at or now,
            )
            pairs = [(d.id, d.subscription.id) for d in due]
            claimed = []
            for delivery_id in fair_share(pairs, in_flight, max_in_flight, limit):
                d = self._deliveries[delivery_id]
                d.attempts += 1
                d.next_attempt_at = d.claimed_until = now + lease
                claimed.append(_claimed(d, now))
        return claimed

    def record(
        self, results: Sequence[AttemptResult], now: datetime, disable_after: timedelta
    ) -> None:
        """Apply each attempt's decision and the subscriptions' failure streaks."""
        with self._lock:
            for result in results:
                d = self._deliveries.get(result.delivery.delivery_id)
                if d is None or d.attempts != result.delivery.attempt:
                    continue  # claimed again (replayed or lease expired) since
                decision = result.decision
                d.status, d.next_attempt_at = decision.status, decision.next_attempt_at
                d.last_status_code, d.last_error = decision.last_status_code, decision.last_error
                d.delivered_at, d.claimed_until = decision.delivered_at, None
                sub = d.subscription
                streak = failure_streak(sub.failing_since, result.outcome, now, disable_after)
                sub.failing_since = streak.failing_since
                if streak.disable_reason and sub.enabled:
                    sub.enabled, sub.disabled_reason = False, streak.disable_reason

    def release(self, deliveries: Sequence[ClaimedDelivery], now: datetime) -> None:
        """Hand back claimed, unattempted deliveries, due now and uncounted."""
        with self._lock:
            for claimed in deliveries:
                d = self._deliveries.get(claimed.delivery_id)
                if d is not None and d.attempts == claimed.attempt and d.status != DELIVERED:
                    d.attempts -= 1
                    d.next_attempt_at, d.claimed_until = now, None

    def next_due(self, now: datetime) -> datetime | None:
        """When the earliest unclaimed delivery falls due."""
        with self._lock:
            times = [
                d.next_attempt_at
                for d in self._deliveries.values()
                if d.status in _CLAIMABLE and d.subscription.enabled and d.next_attempt_at
            ]
        return min(times, default=None)


def _is_due(d: MemoryDelivery, now: datetime) -> bool:
    return (
        d.status in _CLAIMABLE
        and d.subscription.enabled
        and d.next_attempt_at is not None
        and d.next_attempt_at <= now
    )


def _claimed(d: MemoryDelivery, now: datetime) -> ClaimedDelivery:
    sub = d.subscription
    return ClaimedDelivery(
        delivery_id=d.id,
        event_id=d.event.id,
        topic=d.event.topic,
        payload=d.event.payload,
        event_created_at=d.event.created_at,
        subscription_id=sub.id,
        url=sub.url,
        secrets=tuple(
            active_secrets(sub.secret, sub.previous_secret, sub.previous_secret_expires_at, now)
        ),
        attempt=d.attempts,
        tenant_id=d.event.tenant_id,
        lease_ends_at=d.claimed_until,
    )
