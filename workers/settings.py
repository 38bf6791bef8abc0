"""The workers' settings, read from the environment once at a process entry point.

Every field is an environment variable of the upper-cased name (`WORKER_THREADS=16`); durations
accept seconds (`HEARTBEAT_TIMEOUT=30`) or ISO 8601 (`PT30S`). With neither `BROKER_URL` nor
`REDIS_URL` set, messages stay in the process (`StubBroker`): that is what `billing run` and
`billing demo` use on a fresh clone.

Why the defaults are what they are:

- Retries: a billing job fails transiently when the database or Redis blips. 8 retries with
  exponential backoff from 10 s, capped at 10 min, and jittered (each delay drawn between half
  and all of its value) span roughly 15 to 30 minutes; then the message is dead-lettered, where
  `billing jobs` shows it. Dramatiq's own default (20 retries over up to a week) would keep a
  broken invoice retrying long after anyone looked.
- A crashed worker's unacknowledged messages come back once its heartbeat is
  `HEARTBEAT_TIMEOUT` old and a maintenance pass runs on the queue. With
  `MAINTENANCE_CHANCE=1000000` every broker command of a live process on the queue is such a
  pass, and an idle worker polls at least once a second, so they are back on the queue within
  `HEARTBEAT_TIMEOUT + 1 s` (31 s by default) of the crash while any other worker runs.
  A live worker refreshes its heartbeat at least once a second (its delay-queue consumer keeps
  polling even while every thread is busy), so a 30 s timeout only misfires on a process stalled
  or cut off from Redis for 30 s, and then the jobs' idempotency makes the second run harmless.
  Heartbeats carry each machine's clock: keep worker clocks within a few seconds (NTP).
- Provider sync (`PROVIDER_SYNC`): `billing.sync_invoice` retries longer than the ledger jobs,
  because a payment provider's outage lasts longer than a database blip: 10 retries with delays
  doubling from `JOB_MIN_BACKOFF` up to `SYNC_MAX_BACKOFF` (1 h) span about 1.2 to 2.4 hours.
  Whatever is still unsynced `SYNC_PENDING_AFTER` (3 h, past that span) after its invoice was
  created is sent again by the scheduler's hourly sweep, so neither an outage nor a message lost
  between the invoice's commit and its enqueue loses a sync. The sweep looks back
  `SYNC_LOOKBACK` (31 days) only: turning `PROVIDER_SYNC` on does not send years of old invoices.
- `billing status` fails (exit 1) on what needs a human; its thresholds are the `STATUS_*`
  settings below.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal, Self

from apscheduler.triggers.cron import CronTrigger
from pydantic import AliasChoices, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _seconds(value: Any) -> Any:
    """Environment values are strings: read `"30"` or `"0.5"` as seconds, like the numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Duration = Annotated[timedelta, BeforeValidator(_seconds)]
"""A `timedelta` given in seconds (`30`, `0.5`) or ISO 8601 (`PT30S`)."""

#: How many broker commands out of a million run queue maintenance (Dramatiq's scale).
MAINTENANCE_SCALE = 1_000_000


class LogSettings(BaseSettings):
    """How the processes log (`LOG_FORMAT`, `LOG_LEVEL`); read by every entry point."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    log_format: Literal["text", "json"] = "text"
    """`text`: one human-readable line per record; `json`: one JSON object per line, with the
    job fields (`job`, `outcome`, `duration_ms`, `tenant_id`, ids) as keys."""

    log_level: str = "INFO"
    """Lowest level logged: `DEBUG`, `INFO`, `WARNING`, `ERROR`."""

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {value!r}")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class WorkerSettings(LogSettings):
    """Broker, retry, time limits and schedule of the billing workers and scheduler."""

    broker_url: str = Field(default="", validation_alias=AliasChoices("BROKER_URL", "broker_url"))
    """Where messages go: `redis://…` (Redis), `amqp://…` (RabbitMQ), empty or `stub://`
    (in-process). Empty falls back to `REDIS_URL`."""

    redis_url: str = Field(default="", validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    """Redis for the broker (when `BROKER_URL` is empty) and for the scheduler's fire locks."""

    namespace: str = Field(
        default="billing", validation_alias=AliasChoices("BROKER_NAMESPACE", "namespace")
    )
    """Prefix of every Redis key the broker and the scheduler write."""

    worker_processes: int = Field(default=2, ge=1, le=64)
    """Worker processes of the Procfile's `worker` line (`dramatiq --processes`)."""

    worker_threads: int = Field(default=8, ge=1, le=256)
    """Threads per worker process (`dramatiq --threads`, and `billing run`)."""

    job_max_retries: int = Field(default=8, ge=0, le=30)
    """Retries of a job that failed with a transient error, before it is dead-lettered."""

    job_min_backoff: Duration = timedelta(seconds=10)
    """First retry delay; doubles on each retry (jittered)."""

    job_max_backoff: Duration = timedelta(minutes=10)
    """Longest delay between two retries."""

    job_time_limit: Duration = timedelta(minutes=5)
    """A job running longer is interrupted (and retried)."""

    job_max_age: Duration = timedelta(hours=24)
    """A message not started this long after it was first sent is dead-lettered, not run."""

    dead_message_ttl: Duration = timedelta(days=7)
    """How long Redis keeps dead-lettered messages."""

    heartbeat_timeout: Duration = timedelta(seconds=30)
    """A worker silent this long is dead: its unacknowledged messages go back to the queue."""

    maintenance_chance: int = Field(default=MAINTENANCE_SCALE, ge=1, le=MAINTENANCE_SCALE)
    """Broker commands out of a million that also requeue dead workers' messages."""

    prometheus: bool = False
    """Export Dramatiq's metrics (`dramatiq_messages_total`, …) from the worker processes."""

    prometheus_host: str = "127.0.0.1"
    """Address of the metrics endpoint of the `dramatiq` worker (Prometheus on)."""

    prometheus_port: int = Field(default=9191, ge=1, le=65535)
    """Port of that endpoint."""

    aggregate_cron: str = "10 * * * *"
    """When the daily aggregation fan-out runs (crontab, UTC): hourly, so each zone's day is
    aggregated soon after it ends there."""

    invoice_cron: str = "30 * 1,2 * *"
    """When the monthly invoice fan-out runs (crontab, UTC): every hour of the 1st and 2nd, by
    when every zone's month has ended; each zone's month is enqueued by the first fire after."""

    late_event_window_days: int = Field(default=1, ge=0, le=31)
    """Days before yesterday that the daily run aggregates again, to count late events."""

    misfire_grace: Duration = timedelta(hours=1)
    """A fire delayed less than this (a busy or paused scheduler) still runs."""

    fire_lock_ttl: Duration = timedelta(days=45)
    """How long the Redis key recording that a fire was enqueued lives (longer than a month)."""

    fire_lease: Duration = Field(default=timedelta(minutes=5), gt=timedelta(0))
    """How long a running fan-out holds its fire without renewing: a scheduler that dies mid
    fan-out frees the fire this long after, and a retry or a restart runs it again."""

    fanout_batch_size: int = Field(default=1000, ge=1, le=100_000)
    """Rows fetched per round trip while the scheduler streams (tenant, metric) pairs."""

    enqueue_retry_for: Duration = timedelta(minutes=10)
    """How long the scheduler retries sending while Redis is unreachable before it gives up."""

    scheduler_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the scheduler's Prometheus `/metrics` endpoint; 0 (the default) serves none."""

    scheduler_metrics_host: str = "127.0.0.1"
    """Address that endpoint listens on (`0.0.0.0` to let another machine scrape it)."""

    provider_sync: str = ""
    """`package.module:name` of the payment provider hook; empty: invoices stay ours only.
    `name` is either the hook itself, a plain or `async` callable `(invoice, lines)` returning
    the provider's invoice id, or a factory callable with no arguments that returns the hook
    (called once when a worker process boots, e.g. to build a `StripeInvoiceSync` from secrets).
    """

    sync_max_retries: int = Field(default=10, ge=0, le=30)
    """Retries of `billing.sync_invoice` before it is dead-lettered."""

    sync_max_backoff: Duration = timedelta(hours=1)
    """Longest delay between two retries of `billing.sync_invoice`."""

    sync_sweep_cron: str = "15 * * * *"
    """When the scheduler re-sends unsynced invoices (crontab, UTC; with `PROVIDER_SYNC`)."""

    finalize_sweep_cron: str = "*/10 * * * *"
    """When the scheduler finalizes drafts whose `INVOICE_GRACE_PERIOD` has ended (crontab,
    UTC; only with a grace period)."""

    partition_cron: str = "5 0 * * *"
    """When the scheduler creates the monthly partitions of `usage_events` ahead (crontab, UTC;
    PostgreSQL only). It also runs on start."""

    partitions_ahead: int = Field(default=3, ge=1, le=24)
    """How many months after the current one always have their partition."""

    sync_pending_after: Duration = timedelta(hours=3)
    """An invoice still without a provider id this long after it was created is sent again."""

    sync_lookback: Duration = timedelta(days=31)
    """The sweep and `billing status` only consider invoices created this recently."""

    status_max_delivery_delay: Duration = timedelta(minutes=15)
    """`billing status` fails when a due webhook delivery has waited longer than this."""

    status_max_aggregate_age: Duration = timedelta(hours=36)
    """`billing status` fails when the newest aggregate is older than this while usage of a
    finished day has none."""

    status_invoice_grace: Duration = timedelta(hours=6)
    """`billing status` fails when last month's invoices are missing this long after the
    `INVOICE_CRON` fire."""

    status_max_unsynced_age: Duration = timedelta(hours=6)
    """`billing status` fails when an invoice has had no provider id this long after it was
    created (with `PROVIDER_SYNC` only)."""

    status_dead_window: Duration = timedelta(hours=24)
    """`billing status` fails when a message was dead-lettered, or a webhook delivery died,
    within this window; older ones are shown but no longer fail it."""

    @field_validator(
        "aggregate_cron", "invoice_cron", "sync_sweep_cron", "finalize_sweep_cron", "partition_cron"
    )
    @classmethod
    def _check_cron(cls, value: str) -> str:
        CronTrigger.from_crontab(value, timezone="UTC")
        return value

    @field_validator("broker_url", "redis_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(_KNOWN_SCHEMES):
            raise ValueError(f"unsupported broker URL scheme in {value!r}")
        return value

    @field_validator("provider_sync")
    @classmethod
    def _check_import_path(cls, value: str) -> str:
        value = value.strip()
        if value and not _IMPORT_PATH.fullmatch(value):
            raise ValueError(f"PROVIDER_SYNC must look like package.module:name, not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.job_min_backoff <= timedelta(0):
            raise ValueError("JOB_MIN_BACKOFF must be positive")
        if self.job_max_backoff < self.job_min_backoff:
            raise ValueError("JOB_MAX_BACKOFF must be at least JOB_MIN_BACKOFF")
        if self.job_max_backoff > timedelta(days=7):
            raise ValueError("JOB_MAX_BACKOFF must be at most 7 days (Dramatiq's delay limit)")
        if not self.job_min_backoff <= self.sync_max_backoff <= timedelta(days=7):
            raise ValueError("SYNC_MAX_BACKOFF must be between JOB_MIN_BACKOFF and 7 days")
        for name in (
            "job_time_limit",
            "job_max_age",
            "dead_message_ttl",
            "heartbeat_timeout",
            "sync_pending_after",
            "sync_lookback",
            *(n for n in type(self).model_fields if n.startswith("status_")),
        ):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name.upper()} must be positive")
        if self.heartbeat_timeout < timedelta(seconds=2):
            raise ValueError("HEARTBEAT_TIMEOUT below 2 s would requeue live workers' messages")
        return self

    @property
    def effective_broker_url(self) -> str:
        """The URL the broker connects to: `BROKER_URL`, else `REDIS_URL`, else in-process."""
        return self.broker_url or self.redis_url

    @property
    def lock_redis_url(self) -> str:
        """The Redis the scheduler locks its fires in (empty: in-process locks only)."""
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_url.startswith(_REDIS_SCHEMES) else ""

    @property
    def requeue_bound(self) -> timedelta:
        """Longest time a crashed worker's messages wait before another worker gets them.

        Exact when every command is a maintenance pass; otherwise the expected wait.
        """
        polls = MAINTENANCE_SCALE / self.maintenance_chance
        return self.heartbeat_timeout + timedelta(seconds=polls)


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_KNOWN_SCHEMES = (*_REDIS_SCHEMES, "amqp://", "amqps://", "stub://")
