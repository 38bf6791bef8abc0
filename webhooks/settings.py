"""Settings of the relay and the webhook commands, read from the environment once.

Every variable is `WEBHOOKS_<FIELD>` (upper case), except the database URL, which is also read
from the shared `DATABASE_URL`. Durations are a number with an optional unit (`86400`, `24h`,
`5d`, `500ms`; no unit means seconds) or ISO 8601 (`PT24H`); the retry schedule is a
comma-separated list of them, such as `5s,5m,30m,2h`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from webhooks.encryption import SecretBox

DEFAULT_DATABASE_URL = "sqlite:///billing.sqlite3"

#: Delays before each retry: 10 attempts in all, spread over about 3.8 days (over 3 days even
#: when every delay is jittered 20% shorter).
DEFAULT_RETRY_SCHEDULE = "5s,5m,30m,2h,5h,10h,20h,24h,30h"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")


def parse_duration(text: str) -> timedelta:
    """`"5m"` → 5 minutes; a bare number is seconds.

    Raises:
        ValueError: not a number with an optional unit (ms, s, m, h, d).
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"bad retry delay {text!r}: use a number and ms, s, m, h or d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])


def parse_schedule(text: str) -> tuple[timedelta, ...]:
    """`"5s,5m,2h"` → the delays.

    Raises:
        ValueError: an entry is not a duration.
    """
    return tuple(parse_duration(entry) for entry in text.split(","))


class WebhookSettings(BaseSettings):
    """How the relay delivers and how the webhook commands reach the database.

    Attributes:
        database_url: `WEBHOOKS_DATABASE_URL` or `DATABASE_URL`; the database holding the
            outbox (default `sqlite:///billing.sqlite3`).
        concurrency: deliveries in flight at once per relay process (default 16).
        batch_size: most deliveries claimed by one query (default 100).
        connect_timeout: seconds to open a connection to a subscriber (default 5).
        read_timeout: seconds to wait for each read of a subscriber's answer (default 10).
        attempt_timeout: seconds one attempt may take in all, connecting, sending and reading
            the headers and body (default 30): a subscriber dripping its answer is cut off.
        max_in_flight_per_subscription: most deliveries of one subscription in flight at once,
            over every relay (default 2), so slow subscribers cannot take every slot.
        retry_schedule: delays before the 2nd, 3rd, … attempts; after the last the delivery is
            `dead` (default `5s,5m,30m,2h,5h,10h,20h,24h,30h`: 10 attempts over ~3.8 days).
        jitter: each delay is multiplied by a random factor in `[1 - jitter, 1 + jitter]`
            (default 0.2).
        retry_after_max: longest `Retry-After` (on 429 and 503) that is honoured (default 1d).
        disable_after: a subscription whose deliveries have all failed for this long is disabled
            (default 5d).
        secret_grace: how long a rotated-out secret still signs deliveries (default 24h).
        allow_loopback: deliver to loopback addresses such as 127.0.0.1 (default false; tests and
            the embedded set-up turn it on).
        allow_private_networks: deliver to private and other non-public addresses, loopback
            included (default false). Multicast, link-local and cloud metadata addresses are
            never delivered to (see `webhooks.ssrf`).
        poll_interval: seconds between polls for due deliveries when no notification arrives
            (default 1).
        listen: on PostgreSQL, wake on `LISTEN/NOTIFY` when an event commits (default true).
        claim_lease: how long a claimed delivery stays reserved for the relay that claimed it;
            if that relay dies, another sends it after this (default 5m). An attempt ends
            before its lease does: a short lease shortens `attempt_timeout`.
        shutdown_timeout: seconds a stopping relay waits for deliveries in flight (default 30).
        secret_key: Fernet keys, comma-separated, encrypting subscription secrets at rest (the
            first encrypts, any decrypts; default unset: stored as they are). See
            `webhooks.encryption`.
        retention: delivered deliveries, and events left without deliveries, are deleted this
            long after (default 30d; 0 keeps everything). See `webhooks.retention`.
        prune_interval: how often each relay prunes (default 1h).
        user_agent: the `User-Agent` of every delivery (default `billing-workers-webhooks/0.1`).
        metrics_port: port of the relay's Prometheus `/metrics` endpoint; 0 serves none
            (default 0).
        metrics_host: address that endpoint listens on (default `127.0.0.1`; `0.0.0.0` to let
            another machine scrape it).
        log_format: `LOG_FORMAT`, shared with the billing processes: `text` (default) or `json`
            (one object per line, the delivery fields as keys).
        log_level: `LOG_LEVEL`, shared too (default `INFO`).
    """

    model_config = SettingsConfigDict(env_prefix="WEBHOOKS_", extra="ignore")

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("WEBHOOKS_DATABASE_URL", "DATABASE_URL", "database_url"),
    )
    concurrency: int = Field(default=16, ge=1, le=512)
    batch_size: int = Field(default=100, ge=1, le=10_000)
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=10.0, gt=0)
    attempt_timeout: float = Field(default=30.0, gt=0)
    max_in_flight_per_subscription: int = Field(default=2, ge=1, le=10_000)
    retry_schedule: Annotated[tuple[timedelta, ...], NoDecode] = Field(
        default=parse_schedule(DEFAULT_RETRY_SCHEDULE), min_length=1
    )
    jitter: float = Field(default=0.2, ge=0, lt=1)
    retry_after_max: timedelta = timedelta(days=1)
    disable_after: timedelta = timedelta(days=5)
    secret_grace: timedelta = timedelta(hours=24)
    allow_loopback: bool = False
    allow_private_networks: bool = False
    poll_interval: float = Field(default=1.0, gt=0)
    listen: bool = True
    claim_lease: timedelta = timedelta(minutes=5)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    secret_key: SecretStr | None = None
    retention: timedelta = timedelta(days=30)
    prune_interval: timedelta = timedelta(hours=1)
    user_agent: str = "billing-workers-webhooks/0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=AliasChoices("LOG_FORMAT", "log_format")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", validation_alias=AliasChoices("LOG_LEVEL", "log_level")
    )

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: Any) -> Any:
        return parse_schedule(value) if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "retry_after_max",
        "disable_after",
        "secret_grace",
        "claim_lease",
        "retention",
        "prune_interval",
        mode="before",
    )
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        if isinstance(value, str) and _DURATION.fullmatch(value):
            return parse_duration(value)
        return value

    def secret_box(self) -> SecretBox | None:
        """The cipher of stored secrets, if `secret_key` is set.

        Raises:
            SecretKeyError: the key is malformed.
        """
        return SecretBox.from_setting(
            self.secret_key.get_secret_value() if self.secret_key else None
        )

    @property
    def max_attempts(self) -> int:
        """Attempts before a delivery is `dead`: the first one plus one per scheduled delay."""
        return len(self.retry_schedule) + 1
