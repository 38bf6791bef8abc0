"""Retention: delivered deliveries and old events are deleted after `WEBHOOKS_RETENTION`.

`prune` deletes, in batches of `batch_size` rows, each batch its own short transaction (no lock
held for long, no giant transaction for the WAL or the vacuum):

- deliveries `delivered` before `now - retention`;
- events created before `now - retention` that have no delivery left (those with a `pending`,
  `failed` or `dead` delivery stay, so they can still be delivered or replayed).

The relay runs it every `prune_interval` (`Pruner`, a thread of `python -m webhooks.relay` and
`billing run`); `billing webhooks prune` runs it once. Several relays pruning at once is safe: on
PostgreSQL each batch skips rows another one holds. An event id published again after its event
was pruned makes a new event: keep the retention longer than any window in which the same event
may be published again. `WEBHOOKS_RETENTION=0` keeps everything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from webhooks.models import DELIVERED, WebhookDelivery, WebhookEvent
from webhooks.sqltypes import utcnow

logger = logging.getLogger(__name__)

#: Rows deleted per transaction.
DEFAULT_BATCH = 1000


@dataclass(frozen=True)
class Pruned:
    """How many rows one `prune` deleted."""

    deliveries: int
    events: int


def prune(
    sessions: sessionmaker[Session],
    now: datetime,
    retention: timedelta,
    *,
    batch_size: int = DEFAULT_BATCH,
    stop: threading.Event | None = None,
) -> Pruned:
    """Delete delivered deliveries, then events without deliveries, older than `retention`;
    stop between batches once `stop` is set."""
    cutoff = now - retention
    delivered = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == DELIVERED, WebhookDelivery.delivered_at < cutoff)
        .order_by(WebhookDelivery.delivered_at)
    )
    unreferenced = (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.created_at < cutoff,
            ~exists().where(WebhookDelivery.event_id == WebhookEvent.id),
        )
        .order_by(WebhookEvent.created_at)
    )
    stop = stop or threading.Event()
    deliveries = _in_batches(sessions, WebhookDelivery, delivered, batch_size, stop)
    events = _in_batches(sessions, WebhookEvent, unreferenced, batch_size, stop)
    return Pruned(deliveries, events)


def _in_batches(
    sessions: sessionmaker[Session],
    model: type[WebhookDelivery] | type[WebhookEvent],
    candidates: Select[str],
    batch_size: int,
    stop: threading.Event,
) -> int:
    total = 0
    while not stop.is_set():
        with sessions.begin() as session:
            batch = candidates.limit(batch_size)
            if session.get_bind().dialect.name == "postgresql":
                batch = batch.with_for_update(skip_locked=True)
            ids = list(session.scalars(batch))
            if ids:
                session.execute(delete(model).where(model.id.in_(ids)))
        total += len(ids)
        if len(ids) < batch_size:
            break
    return total


class Pruner:
    """Runs `prune` now and every `interval` in a thread until stopped; errors are logged."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        retention: timedelta,
        interval: timedelta,
        *,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._retention = retention
        self._interval = interval
        self._now = now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-prune", daemon=True)

    def start(self) -> Pruner:
        """Start pruning."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the batch in progress."""
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pruned = prune(self._sessions, self._now(), self._retention, stop=self._stop)
            except Exception:
                logger.exception("pruning old webhook rows failed; trying again later")
            else:
                if pruned.deliveries or pruned.events:
                    logger.info(
                        "pruned %d delivered deliveries and %d events older than %s",
                        pruned.deliveries,
                        pruned.events,
                        self._retention,
                    )
            self._stop.wait(self._interval.total_seconds())
