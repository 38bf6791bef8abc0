"""WorkerSettings: read from the environment, defaults chosen for billing, bad values refused."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from workers.settings import WorkerSettings


def test_defaults_bound_retries_and_requeue_time() -> None:
    settings = WorkerSettings()
    assert settings.effective_broker_url == ""
    assert (settings.job_max_retries, settings.job_min_backoff, settings.job_max_backoff) == (
        8,
        timedelta(seconds=10),
        timedelta(minutes=10),
    )
    assert settings.requeue_bound == timedelta(seconds=31)


def test_values_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("HEARTBEAT_TIMEOUT", "5")
    monkeypatch.setenv("JOB_MAX_BACKOFF", "PT2M")
    monkeypatch.setenv("WORKER_THREADS", "16")
    monkeypatch.setenv("AGGREGATE_CRON", "5 1 * * *")
    monkeypatch.setenv("BROKER_NAMESPACE", "acme-billing")
    settings = WorkerSettings()
    assert settings.effective_broker_url == "redis://127.0.0.1:6379/2"
    assert settings.lock_redis_url == "redis://127.0.0.1:6379/2"
    assert settings.heartbeat_timeout == timedelta(seconds=5)
    assert settings.job_max_backoff == timedelta(minutes=2)
    assert (settings.worker_threads, settings.aggregate_cron) == (16, "5 1 * * *")
    assert settings.namespace == "acme-billing"


def test_rabbitmq_broker_keeps_locks_on_redis(monkeypatch) -> None:
    monkeypatch.setenv("BROKER_URL", "amqp://127.0.0.1:5672")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = WorkerSettings()
    assert settings.effective_broker_url == "amqp://127.0.0.1:5672"
    assert settings.lock_redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "fields",
    [
        {"aggregate_cron": "every day"},
        {"job_min_backoff": timedelta(0)},
        {"job_min_backoff": timedelta(minutes=5), "job_max_backoff": timedelta(minutes=1)},
        {"job_max_backoff": timedelta(days=8)},
        {"heartbeat_timeout": timedelta(seconds=1)},
        {"maintenance_chance": 0},
        {"job_max_retries": -1},
        {"broker_url": "kafka://x"},
    ],
)
def test_unsafe_values_are_refused(fields) -> None:
    with pytest.raises(ValidationError):
        WorkerSettings(**fields)
