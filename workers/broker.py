"""The Dramatiq broker and its middleware, built from `WorkerSettings` in this one place.

`build_broker` picks the broker from the URL (`redis://` → `RedisBroker`, `amqp://` →
`RabbitmqBroker`, empty or `stub://` → the in-process `StubBroker`) and gives it Dramatiq's own
middleware with billing's bounds:

- `Retries`: exponential backoff with jitter between `JOB_MIN_BACKOFF` and `JOB_MAX_BACKOFF`,
  at most `JOB_MAX_RETRIES` times (each actor also carries these bounds, see `actor_options`);
  errors in `PERMANENT_ERRORS` are never retried (`throws=`).
- `TimeLimit` (`JOB_TIME_LIMIT`), `AgeLimit` (`JOB_MAX_AGE`), shutdown notifications, callbacks
  and pipelines, as in Dramatiq's default stack.
- Dead letters: a message that exhausted its retries, raised a permanent error or outlived its
  age is moved to the queue's dead-letter set (Redis keeps it `DEAD_MESSAGE_TTL`), and
  `DeadLetterLog` logs it at ERROR with its arguments.
- `Prometheus` when `PROMETHEUS` is on.

On Redis, `heartbeat_timeout` and `maintenance_chance` come from the settings; see
`workers.settings` for the bound they put on requeueing a crashed worker's messages.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import redis
from dramatiq import Broker, Middleware
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: The queue both billing actors consume.
QUEUE_NAME = "billing"

#: Socket timeouts of the broker's Redis connections: an outage raises instead of hanging.
REDIS_SOCKET_TIMEOUT_S = 10.0


def ms(seconds: float) -> int:
    """Milliseconds, the unit Dramatiq takes, from seconds."""
    return round(seconds * 1000)


def actor_options(settings: WorkerSettings) -> dict[str, Any]:
    """The retry, time and age bounds every billing actor declares (`throws=` is the actor's)."""
    return {
        "queue_name": QUEUE_NAME,
        "max_retries": settings.job_max_retries,
        "min_backoff": ms(settings.job_min_backoff.total_seconds()),
        "max_backoff": ms(settings.job_max_backoff.total_seconds()),
        "time_limit": ms(settings.job_time_limit.total_seconds()),
        "max_age": ms(settings.job_max_age.total_seconds()),
    }


def sync_actor_options(settings: WorkerSettings) -> dict[str, Any]:
    """`actor_options` with the longer retry bounds of `billing.sync_invoice` (`SYNC_*`)."""
    return {
        **actor_options(settings),
        "max_retries": settings.sync_max_retries,
        "max_backoff": ms(settings.sync_max_backoff.total_seconds()),
    }


def build_middleware(settings: WorkerSettings) -> list[Middleware]:
    """Dramatiq's middleware stack with billing's bounds (the same defaults as each actor's)."""
    stack: list[Middleware] = [
        # First in the list, so its `after_*` hooks (run in reverse order) see Retries' verdict.
        DeadLetterLog(),
        AgeLimit(max_age=ms(settings.job_max_age.total_seconds())),
        TimeLimit(time_limit=ms(settings.job_time_limit.total_seconds())),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(
            max_retries=settings.job_max_retries,
            min_backoff=ms(settings.job_min_backoff.total_seconds()),
            max_backoff=ms(settings.job_max_backoff.total_seconds()),
        ),
        CurrentMessage(),
        OneShutdownPerSigterm(),
    ]
    if settings.prometheus:
        stack.append(_prometheus(settings))
    return stack


def build_broker(settings: WorkerSettings, *, redis_client: redis.Redis | None = None) -> Broker:
    """The broker the settings ask for, with `build_middleware`'s stack.

    `redis_client` (e.g. a `fakeredis.FakeRedis`) makes a `RedisBroker` on that client whatever
    the URL says.

    Raises:
        ValueError: the URL's scheme is not one we support.
    """
    url = settings.effective_broker_url
    middleware = build_middleware(settings)
    if redis_client is not None or url.startswith(("redis://", "rediss://", "unix://")):
        client = redis_client or redis.Redis.from_url(
            url,
            socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        return RedisBroker(  # type: ignore[no-untyped-call]
            client=client,
            middleware=middleware,
            namespace=settings.namespace,
            heartbeat_timeout=ms(settings.heartbeat_timeout.total_seconds()),
            maintenance_chance=settings.maintenance_chance,
            dead_message_ttl=ms(settings.dead_message_ttl.total_seconds()),
        )
    if url.startswith(("amqp://", "amqps://")):
        # RabbitMQ returns a dead connection's unacknowledged messages itself: no heartbeat knob.
        return RabbitmqBroker(url=url, middleware=middleware)
    if url in ("", "stub://"):
        return StubBroker(middleware=middleware)
    raise ValueError(f"unsupported broker URL {url!r}: use redis://, amqp:// or stub://")


def is_in_process(broker: Broker) -> bool:
    """True for the `StubBroker`: messages never leave this process."""
    return isinstance(broker, StubBroker)


class DeadLetterLog(Middleware):
    """Logs at ERROR every message that is about to be dead-lettered, and why, and keeps the
    why on the dead letter (its `traceback` option, which `billing jobs` and `billing status`
    show): on Redis the dead letter's stored body is rewritten after the broker moved it.

    Its hooks run after those of `Retries` (which decides whether a failure is final), so
    `message.failed` is set for exhausted retries and `throws=` errors alike; `AgeLimit` fails
    the messages it skips. (`Retries` records a traceback only for errors it retries.)
    """

    def after_process_message(
        self,
        broker: Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if message.failed:
            reason = f"{type(exception).__name__}: {exception}" if exception else "failed"
            _log_dead_letter(message, reason)
            message.options["traceback"] = reason

    def after_skip_message(self, broker: Broker, message: Any) -> None:
        if message.failed:
            _log_dead_letter(message, "older than its age limit")
            message.options["traceback"] = "older than its age limit"

    def after_nack(self, broker: Broker, message: Any) -> None:
        redis_id = message.options.get("redis_message_id")
        if isinstance(broker, RedisBroker) and redis_id is not None:
            dead = f"{broker.namespace}:{message.queue_name}.XQ.msgs"
            _replace_if_present(broker.client, [dead], [redis_id, message.encode()])


# Rewrites a dead letter's body unless it is gone already (purged, or expired by maintenance).
_REPLACE_IF_PRESENT_LUA = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then
    redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
end
"""


def _replace_if_present(client: Any, keys: list[str], args: list[Any]) -> None:
    client.eval(_REPLACE_IF_PRESENT_LUA, len(keys), *keys, *args)


class OneShutdownPerSigterm(Middleware):
    """Keeps a process-group SIGTERM from killing `dramatiq` worker processes mid-job.

    Procfile runners and platforms signal every process of the group, and Dramatiq's main
    process forwards the signal too, so each worker process gets SIGTERM twice at once; Dramatiq
    reads the second as "kill now" and drops the jobs in hand. This drops a repeat that comes
    within `window_s` of the first, so the jobs in hand finish; a later SIGTERM still kills.
    """

    window_s = 5.0

    def after_process_boot(self, broker: Broker) -> None:
        dramatiq_handler = signal.getsignal(signal.SIGTERM)
        if not callable(dramatiq_handler):
            return
        first: list[float] = []

        def on_sigterm(signum: int, frame: FrameType | None) -> Any:
            now = time.monotonic()
            if first and now - first[0] < self.window_s:
                logger.info("repeated SIGTERM ignored: already stopping after the jobs in hand")
                return None
            first[:] = [now]
            return dramatiq_handler(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)


def _log_dead_letter(message: Any, reason: str) -> None:
    logger.error(
        "dead-lettering message %s of %s after %d retries (args=%r): %s",
        message.message_id,
        message.actor_name,
        message.options.get("retries", 0),
        message.args,
        reason,
    )


def _prometheus(settings: WorkerSettings) -> Middleware:
    # Imported only when asked for: the module creates its metrics directory on import.
    from dramatiq.middleware import prometheus

    prometheus.HTTP_HOST = settings.prometheus_host
    prometheus.HTTP_PORT = settings.prometheus_port
    return prometheus.Prometheus()
