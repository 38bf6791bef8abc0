"""The pluggable parts, as protocols: where events, subscriptions and deliveries are kept.

SQL implementations are the production default (`webhooks.outbox`, `webhooks.subscriptions`,
`webhooks.store`); in-memory ones (`webhooks.memory`) serve the embedded set-up and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from webhooks.delivery import ClaimedDelivery
from webhooks.policy import Decision, Outcome


@dataclass(frozen=True)
class NewEvent:
    """A validated event about to enter the outbox."""

    id: str
    topic: str
    tenant_id: str | None
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class AttemptResult:
    """One finished attempt: what was sent, what came back, the delivery's next state, and how
    long the request took (`duration`, in seconds)."""

    delivery: ClaimedDelivery
    outcome: Outcome
    decision: Decision
    duration: float = 0.0


class Subscriber(Protocol):
    """What the outbox needs to know of a subscription."""

    @property
    def id(self) -> str: ...


class SubscriptionStore(Protocol):
    """Finds the subscriptions an event goes to."""

    def matching(self, topic: str, tenant_id: str | None) -> Sequence[Subscriber]:
        """Enabled subscriptions of `topic` whose tenant filter is empty or `tenant_id`."""
        ...


class OutboxStore(Protocol):
    """Keeps events and their deliveries."""

    def append(self, event: NewEvent, subscribers: Sequence[Subscriber]) -> bool:
        """Store the event and one pending delivery per subscriber, unless the event id is
        already stored; True if this call stored it."""
        ...


class DeliveryStore(Protocol):
    """Where a relay claims due deliveries and records what became of them."""

    def claim(
        self,
        limit: int,
        now: datetime,
        lease: timedelta,
        max_in_flight: int | None = None,
        chain: int = 1,
    ) -> list[ClaimedDelivery]:
        """Reserve up to `limit` due deliveries of enabled subscriptions until `now + lease`,
        counting the attempt; a delivery is claimed by one relay at a time, and no more than
        `max_in_flight` slots of one subscription are claimed and not yet recorded at once.
        A slot is one delivery, or with `chain` > 1 up to `chain` deliveries of one
        subscription sent one after another (they carry the slot's name)."""
        ...

    def extend(
        self, slot: str, subscription_id: str, limit: int, now: datetime, lease: timedelta
    ) -> list[ClaimedDelivery]:
        """Claim up to `limit` more due deliveries of `subscription_id` into `slot` (as `claim`
        does) if one of the slot's deliveries is still claimed; else none."""
        ...

    def record(
        self, results: Sequence[AttemptResult], now: datetime, disable_after: timedelta
    ) -> None:
        """Store each attempt's decision (unless the delivery was claimed again meanwhile) and
        update the subscriptions' failure streaks, disabling those failing for `disable_after`
        and those whose endpoint is gone."""
        ...

    def release(self, deliveries: Sequence[ClaimedDelivery], now: datetime) -> None:
        """Hand back claimed deliveries that were not attempted, uncounted, due when they fell
        due (`ClaimedDelivery.due_at`, their place in the queue) or else at `now`."""
        ...

    def next_due(self) -> datetime | None:
        """When the earliest unclaimed delivery falls due (None if there is none)."""
        ...
