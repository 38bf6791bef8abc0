"""A relay running in a background thread of this process: `start_relay(settings)`.

`python -m webhooks.relay` runs one until SIGTERM or SIGINT; `billing run` starts one beside the
workers. Either way the relay comes with what it needs: a pooled HTTP client, a PostgreSQL
`LISTEN` connection (to wake when an event commits), a pruner of old rows
(`webhooks.retention`), and, when `WEBHOOKS_METRICS_PORT` is set, a
Prometheus `/metrics` endpoint with the outbox gauges. `stop()` stops it gracefully.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from webhooks import metrics
from webhooks.db import libpq_url, make_engine
from webhooks.delivery import Sender, make_client
from webhooks.listener import PgListener
from webhooks.logs import configure_logging
from webhooks.outbox import NOTIFY_CHANNEL
from webhooks.relay import Relay
from webhooks.retention import Pruner
from webhooks.settings import WebhookSettings
from webhooks.shutdown import stop_on_signals, wait_for_stop
from webhooks.ssrf import AddressPolicy
from webhooks.store import SqlDeliveryStore

logger = logging.getLogger(__name__)

#: Extra seconds to wait for the relay thread beyond its own `shutdown_timeout`.
JOIN_MARGIN = 30.0


class BackgroundRelay:
    """A `Relay` delivering from a thread, and the resources it closes when stopped."""

    name = "webhook relay"

    def __init__(
        self, relay: Relay, shutdown_timeout: float, closers: list[Callable[[], None]]
    ) -> None:
        self.relay = relay
        self._stop = threading.Event()
        self._closers = closers
        self._shutdown_timeout = shutdown_timeout
        self._thread = threading.Thread(target=relay.run, args=(self._stop,), name="webhook-relay")

    def start(self) -> BackgroundRelay:
        """Start delivering."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Claim nothing more, finish the deliveries in flight, hand back the rest, close."""
        self._stop.set()
        self.relay.wake.set()
        self._thread.join(self._shutdown_timeout + JOIN_MARGIN)
        if self._thread.is_alive():
            logger.warning(
                "the relay thread did not stop in time; its claims expire with the lease"
            )
        for close in self._closers:
            close()


def start_relay(settings: WebhookSettings, *, engine: Engine | None = None) -> BackgroundRelay:
    """Start a relay configured by `settings` on `engine` (default: one on
    `settings.database_url`, disposed of on stop)."""
    closers: list[Callable[[], None]] = []
    if engine is None:
        engine = make_engine(settings.database_url)
        closers.append(engine.dispose)
    sessions = sessionmaker(engine, expire_on_commit=False)
    client = make_client(
        policy=AddressPolicy(settings.allow_loopback, settings.allow_private_networks),
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_connections=settings.concurrency,
    )
    closers.insert(0, client.close)
    relay = Relay.from_settings(
        settings,
        SqlDeliveryStore(sessions, box=settings.secret_box()),
        Sender(client, user_agent=settings.user_agent),
    )
    if settings.retention:
        pruner = Pruner(sessions, settings.retention, settings.prune_interval).start()
        closers.insert(0, pruner.stop)
    url = libpq_url(engine)
    if settings.listen and url is not None:
        closers.insert(0, PgListener(url, NOTIFY_CHANNEL, relay.wake.set).start().stop)
    if settings.metrics_port:
        collector = metrics.OutboxCollector(sessions)
        closers.insert(0, metrics.serve(settings.metrics_port, settings.metrics_host, collector))
        logger.info(
            "relay metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port
        )
    return BackgroundRelay(relay, settings.shutdown_timeout, closers).start()


def run_until_signalled(settings: WebhookSettings) -> int:
    """Run a relay until SIGTERM or SIGINT, then stop it gracefully (`python -m webhooks.relay`)."""
    configure_logging(settings.log_format, settings.log_level)
    stopping = stop_on_signals()
    background = start_relay(settings)
    logger.info(
        "relay started: %s, concurrency %d",
        make_url(settings.database_url).render_as_string(hide_password=True),
        settings.concurrency,
    )
    wait_for_stop(stopping)
    background.stop()
    logger.info("relay stopped")
    return 0
