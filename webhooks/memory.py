"""`InMemoryOutboxStore`: the outbox and delivery queue in a process's memory.

For the embedded set-up and tests: it implements both the outbox (`append`) and the relay's
delivery store (`claim`, `record`, `release`, `next_due`), so a `Relay` can deliver from it.
Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    slot: str | None = None


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
        chain: int = 1,
    ) -> list[ClaimedDelivery]:
        """Reserve up to `limit` due deliveries until `now + lease`, counting the attempt, at
        most `max_in_flight` slots of one subscription in flight; round-robin over
        subscriptions. With `chain` > 1 (and a cap) a subscription with a free slot gets one
        holding up to `chain` deliveries, as `SqlDeliveryStore.claim` does."""
        chained = chain > 1 and max_in_flight is not None
        slot = new_id() if chained else None
        with self._lock:
            in_flight = self._slots_in_flight(now)
            due = sorted(
                (d for d in self._deliveries.values() if _is_due(d, now)),
                key=lambda d: d.next_attempt_at or now,
            )
            pairs = [(d.id, d.subscription.id) for d in due]
            if chained:  # a chain per subscription with a free slot, of one if it is failing
                in_flight = self._chain_rooms(in_flight, max_in_flight or 0, chain)
            claimed = []
            for delivery_id in fair_share(
                pairs, in_flight, chain if chained else max_in_flight, limit
            ):
                d = self._deliveries[delivery_id]
                claimed.append(_claim(d, now, lease, slot))
        return claimed

    def extend(
        self, slot: str, subscription_id: str, limit: int, now: datetime, lease: timedelta
    ) -> list[ClaimedDelivery]:
        """Claim up to `limit` more due deliveries of `subscription_id` into `slot` while one
        of the slot's deliveries is claimed, as `SqlDeliveryStore.extend` does."""
        with self._lock:
            mine = [d for d in self._held(now) if d.subscription.id == subscription_id]
            if not any(d.slot == slot for d in mine):
                return []
            due = sorted(
                (
                    d
                    for d in self._deliveries.values()
                    if _is_due(d, now) and d.subscription.id == subscription_id
                ),
                key=lambda d: d.next_attempt_at or now,
            )
            return [_claim(d, now, lease, slot) for d in due[:limit]]

    def _held(self, now: datetime) -> list[MemoryDelivery]:
        return [
            d
            for d in self._deliveries.values()
            if d.status in _CLAIMABLE and d.claimed_until and d.claimed_until > now
        ]

    def _chain_rooms(self, slots: Counter[str], cap: int, chain: int) -> Counter[str]:
        """As `fair_share` counts: `chain` taken of a full subscription, `chain - 1` of a
        failing one, none of the others (a chain of up to `chain` each)."""
        rooms: Counter[str] = Counter()
        for d in self._deliveries.values():
            sid = d.subscription.id
            if slots[sid] >= cap:
                rooms[sid] = chain
            elif d.subscription.failing_since is not None:
                rooms[sid] = chain - 1
        return rooms

    def _slots_in_flight(self, now: datetime) -> Counter[str]:
        """How many slots each subscription has in flight: a chain is one."""
        slots = {(d.subscription.id, d.slot or d.id) for d in self._held(now)}
        return Counter(sid for sid, _ in slots)

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
                d.delivered_at, d.claimed_until, d.slot = decision.delivered_at, None, None
                sub = d.subscription
                streak = failure_streak(sub.failing_since, result.outcome, now, disable_after)
                sub.failing_since = streak.failing_since
                if streak.disable_reason and sub.enabled:
                    sub.enabled, sub.disabled_reason = False, streak.disable_reason

    def release(self, deliveries: Sequence[ClaimedDelivery], now: datetime) -> None:
        """Hand back claimed, unattempted deliveries, uncounted, due when they fell due."""
        with self._lock:
            for claimed in deliveries:
                d = self._deliveries.get(claimed.delivery_id)
                if d is not None and d.attempts == claimed.attempt and d.status != DELIVERED:
                    d.attempts -= 1
                    d.next_attempt_at, d.claimed_until, d.slot = claimed.due_at or now, None, None

    def next_due(self) -> datetime | None:
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


def _claim(d: MemoryDelivery, now: datetime, lease: timedelta, slot: str | None) -> ClaimedDelivery:
    """Count the attempt and hold `d` in `slot` until `now + lease`; what sending it needs."""
    due_at = d.next_attempt_at
    d.attempts += 1
    d.next_attempt_at = d.claimed_until = now + lease
    d.slot = slot
    return replace(_claimed(d, now), due_at=due_at)


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
        slot=d.slot,
    )
