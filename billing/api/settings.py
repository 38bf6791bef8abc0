"""Settings of the web process, read from the environment once in `billing.app`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.api.bodies import DEFAULT_MAX_BATCH_REQUEST_BYTES, DEFAULT_MAX_REQUEST_BYTES
from billing.late_usage import LateUsage
from billing.metric_limit import DEFAULT_MAX_METRICS_PER_TENANT
from billing.settings import DEFAULT_DATABASE_URL


class ApiSettings(BaseSettings):
    """`DATABASE_URL`; `REDIS_URL` (idempotency store; in memory, one process, when unset);
    `IDEMPOTENCY_TTL` (how long responses are replayed, seconds or ISO 8601, default 24 h);
    `IDEMPOTENCY_LOCK_TTL` (how long an unfinished request holds its key, default 5 min);
    `BILLING_PREFIX` (where the routes are mounted, default `/_billing`);
    `MAX_REQUEST_BYTES` (largest request body, default 1 MiB) and `MAX_BATCH_REQUEST_BYTES`
    (largest `/usage/batch` body, default 4 MiB); `BROKER_NAMESPACE` (prefix of the Redis
    keys, default `billing`); `METRICS_TOKEN` (when set, `/metrics` answers only requests with
    `Authorization: Bearer <token>`); `USAGE_MAX_AGE` (the oldest usage accepted over HTTP,
    default 35 days); `LATE_USAGE` (`next_invoice`, `reject` or `ignore`: usage in a period
    that has a finalized invoice, see `billing.late_usage`); `API_KEY_CACHE_TTL` (how long a
    web process may keep an API key it has read, seconds or ISO 8601, default 5 s; only with
    `REDIS_URL`, whose revocation marker `billing keys revoke` changes: 0 reads the key on
    every request); `MAX_METRICS_PER_TENANT` (distinct metrics a tenant may have in a UTC
    month, default 1,000); `METRICS_BIND` (`HOST:PORT`, e.g. `127.0.0.1:9100`: `/metrics` is
    served there, by prometheus_client's own server in the web process, and no longer on the
    app's port)."""

    model_config = SettingsConfigDict(extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    sql_echo: bool = False
    redis_url: str | None = None
    idempotency_ttl: timedelta = timedelta(hours=24)
    idempotency_lock_ttl: timedelta = timedelta(minutes=5)
    billing_prefix: str = "/_billing"
    max_request_bytes: PositiveInt = DEFAULT_MAX_REQUEST_BYTES
    max_batch_request_bytes: PositiveInt = DEFAULT_MAX_BATCH_REQUEST_BYTES
    broker_namespace: str = "billing"
    metrics_token: SecretStr | None = None
    usage_max_age: timedelta = timedelta(days=35)
    late_usage: LateUsage = "next_invoice"
    api_key_cache_ttl: timedelta = timedelta(seconds=5)
    max_metrics_per_tenant: PositiveInt = DEFAULT_MAX_METRICS_PER_TENANT
    metrics_bind: str | None = None

    @field_validator("metrics_bind")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        """`HOST:PORT` (`[::1]:9100` for IPv6); empty means unset."""
        if value is None or not value.strip():
            return None
        split_address(value)
        return value.strip()

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """`METRICS_BIND` as (host, port), or None."""
        return split_address(self.metrics_bind) if self.metrics_bind else None

    @field_validator(
        "idempotency_ttl",
        "idempotency_lock_ttl",
        "usage_max_age",
        "api_key_cache_ttl",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """Plain numbers (as environment strings) are seconds."""
        if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return value


def split_address(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port); ValueError if it is neither."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("METRICS_BIND must be HOST:PORT, e.g. 127.0.0.1:9100")
    return host, int(port)
