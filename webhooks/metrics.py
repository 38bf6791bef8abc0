"""Prometheus metrics of webhook delivery, and the multi-process exposition every process serves.

Counted by the relay, per process (summed over the processes of a machine when
`PROMETHEUS_MULTIPROC_DIR` is set before they start, as prometheus_client requires):

- `webhooks_deliveries_total{outcome}`: attempts by outcome: `delivered` (2xx), `failed` (will be
  retried), `refused` (the SSRF guard kept the request in; dead at once), `gone` (410: the
  delivery is dead and the subscription disabled), `dead` (no attempt left).
- `webhooks_delivery_latency_seconds`: from the event's commit to its successful delivery.
- `webhooks_attempt_duration_seconds`: one attempt's HTTP request, whatever its outcome.

Read from the database at each scrape by `OutboxCollector`, so they are right however many relays
run (deliveries of disabled subscriptions wait for an operator, not a relay: they are left out of
the backlog and the age):

- `webhooks_outbox_backlog{status}`: `pending` and `failed` deliveries, due or not.
- `webhooks_outbox_due`: of those, how many are due now.
- `webhooks_outbox_oldest_pending_age_seconds`: how long the most overdue delivery has waited for a
  relay since it fell due (0 when none is due): a relay lag to alert on.
- `webhooks_deliveries_dead`: dead deliveries (a replay makes them pending again).
- `webhooks_subscriptions_disabled`: subscriptions disabled by the relay or an operator.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from webhooks.interfaces import AttemptResult
from webhooks.models import DEAD, FAILED, PENDING, WebhookDelivery, WebhookSubscription
from webhooks.sqltypes import utcnow


def prepare_multiprocess_dir() -> None:
    """Create the folder `PROMETHEUS_MULTIPROC_DIR` names when it is missing.

    prometheus_client writes every metric's values there from the first metric on, and fails
    on a missing folder; the Procfile names one per machine (`/tmp/billing-metrics`) and a
    Procfile line cannot run `mkdir` first. Called once, here, before any metric is defined:
    `billing.metrics` and `workers.metrics` import this module first.
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)


prepare_multiprocess_dir()

logger = logging.getLogger(__name__)

#: The `outcome` label values of `webhooks_deliveries_total`.
OUTCOMES = ("delivered", "failed", "refused", "gone", "dead")

DELIVERIES = Counter("webhooks_deliveries", "Delivery attempts, by outcome.", ["outcome"])
#: Each outcome's series, made at once (so rate() sees the first attempt) and looked up once.
_DELIVERIES_BY_OUTCOME = {outcome: DELIVERIES.labels(outcome=outcome) for outcome in OUTCOMES}
DELIVERY_LATENCY = Histogram(
    "webhooks_delivery_latency_seconds",
    "From an event's commit to its successful delivery, in seconds.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 21600, 86400),
)
ATTEMPT_DURATION = Histogram(
    "webhooks_attempt_duration_seconds",
    "One delivery attempt's HTTP request, in seconds.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def outcome_of(result: AttemptResult) -> str:
    """The `outcome` label of an attempt (see the module docstring)."""
    if result.outcome.delivered:
        return "delivered"
    if result.outcome.gone:
        return "gone"
    if result.outcome.refused:
        return "refused"
    return "dead" if result.decision.status == DEAD else "failed"


def observe(result: AttemptResult, seconds: float) -> str:
    """Count an attempt that took `seconds`; return its outcome label."""
    outcome = outcome_of(result)
    _DELIVERIES_BY_OUTCOME[outcome].inc()
    ATTEMPT_DURATION.observe(seconds)
    delivered_at = result.decision.delivered_at
    if delivered_at is not None:
        latency = delivered_at - result.delivery.event_created_at
        DELIVERY_LATENCY.observe(max(latency.total_seconds(), 0.0))
    return outcome


# --- figures read from the database ------------------------------------------------------------


@dataclass(frozen=True)
class OutboxStats:
    """The outbox's state at one moment (deliveries of enabled subscriptions, except `dead`)."""

    pending: int
    failed: int
    due: int
    oldest_due_age: timedelta
    dead: int
    subscriptions_disabled: int

    @property
    def backlog(self) -> int:
        """Deliveries still to be made: pending and failed."""
        return self.pending + self.failed


def outbox_stats(session: Session, now: datetime) -> OutboxStats:
    """Read the outbox figures (three small queries on indexed columns)."""
    is_due = WebhookDelivery.next_attempt_at <= now
    backlog = (
        select(
            WebhookDelivery.status,
            func.count(),
            func.coalesce(func.sum(case((is_due, 1), else_=0)), 0),
            func.min(WebhookDelivery.next_attempt_at),
        )
        .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
        .where(
            WebhookDelivery.status.in_((PENDING, FAILED)),
            WebhookSubscription.enabled.is_(True),
        )
        .group_by(WebhookDelivery.status)
    )
    counts = {PENDING: 0, FAILED: 0}
    due = 0
    earliest: datetime | None = None
    for status, count, due_count, first in session.execute(backlog):
        counts[status] = int(count)
        due += int(due_count)
        if first is not None and (earliest is None or first < earliest):
            earliest = first
    dead = session.scalar(select(func.count()).where(WebhookDelivery.status == DEAD))
    disabled = session.scalar(select(func.count()).where(WebhookSubscription.enabled.is_(False)))
    age = max(now - earliest, timedelta(0)) if earliest is not None else timedelta(0)
    return OutboxStats(counts[PENDING], counts[FAILED], due, age, dead or 0, disabled or 0)


class OutboxCollector(Collector):
    """The outbox gauges, read from the database at each scrape.

    If the database does not answer, the scrape leaves these gauges out (and logs why) rather
    than failing the process's other metrics.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], *, now: Callable[[], datetime] = utcnow
    ) -> None:
        self._sessions = session_factory
        self._now = now

    def describe(self) -> Iterable[Metric]:
        """The gauges' names, without touching the database."""
        return _families(None)

    def collect(self) -> Iterable[Metric]:
        """The gauges' current values."""
        try:
            with self._sessions() as session:
                stats = outbox_stats(session, self._now())
        except SQLAlchemyError as error:
            logger.warning("outbox metrics unavailable: %s", error.__class__.__name__)
            return []
        return _families(stats)


def _families(stats: OutboxStats | None) -> list[Metric]:
    backlog = GaugeMetricFamily(
        "webhooks_outbox_backlog",
        "Deliveries to make (pending, failed), due or not; enabled subscriptions only.",
        labels=["status"],
    )
    gauges = {
        "webhooks_outbox_due": "Deliveries due now, waiting for a relay.",
        "webhooks_outbox_oldest_pending_age_seconds": (
            "How long the most overdue delivery has waited since it fell due (0: none is due)."
        ),
        "webhooks_deliveries_dead": "Deliveries given up on (a replay sends them again).",
        "webhooks_subscriptions_disabled": "Subscriptions disabled (by the relay or an operator).",
    }
    if stats is None:
        return [backlog, *(GaugeMetricFamily(name, text) for name, text in gauges.items())]
    backlog.add_metric([PENDING], stats.pending)
    backlog.add_metric([FAILED], stats.failed)
    values = (
        stats.due,
        stats.oldest_due_age.total_seconds(),
        stats.dead,
        stats.subscriptions_disabled,
    )
    return [
        backlog,
        *(
            GaugeMetricFamily(name, text, value=value)
            for (name, text), value in zip(gauges.items(), values, strict=True)
        ),
    ]


# --- exposition --------------------------------------------------------------------------------


def exposition_registry(*collectors: Collector) -> CollectorRegistry:
    """What a `/metrics` endpoint serves: this process's metrics, or, with
    `PROMETHEUS_MULTIPROC_DIR` set, every process's of the machine; plus `collectors`."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    elif not collectors:
        return REGISTRY
    else:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(REGISTRY)
    for collector in collectors:
        registry.register(collector)
    return registry


def render(*collectors: Collector) -> tuple[bytes, str]:
    """The text exposition (see `exposition_registry`) and its content type."""
    return generate_latest(exposition_registry(*collectors)), CONTENT_TYPE_LATEST


def serve(port: int, addr: str = "0.0.0.0", *collectors: Collector) -> Callable[[], None]:
    """Expose `/metrics` on `addr:port` from a background thread; return a function stopping it."""
    server, thread = start_http_server(port, addr=addr, registry=exposition_registry(*collectors))

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
