"""Broker choice, middleware bounds, and the requeue of a crashed worker's messages (fakeredis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
from dramatiq import Worker
from dramatiq.brokers import redis as dramatiq_redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.message import Message
from dramatiq.middleware import AgeLimit, Retries, TimeLimit

from billing.errors import InvalidUsageError, ProviderSyncError
from workers import actors
from workers.broker import QUEUE_NAME, actor_options, build_broker
from workers.errors import InvalidPayloadError
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)


def settings(**fields) -> WorkerSettings:
    return WorkerSettings(**fields)


def test_no_url_means_the_in_process_broker() -> None:
    assert isinstance(build_broker(settings()), StubBroker)
    assert isinstance(build_broker(settings(broker_url="stub://")), StubBroker)


def test_a_redis_url_means_redis_with_the_configured_heartbeat_and_maintenance() -> None:
    broker = build_broker(
        settings(
            redis_url="redis://127.0.0.1:6399/3",
            heartbeat_timeout=timedelta(seconds=12),
            maintenance_chance=5000,
            namespace="acme",
        )
    )
    assert isinstance(broker, RedisBroker)
    assert (broker.heartbeat_timeout, broker.maintenance_chance, broker.namespace) == (
        12_000,
        5000,
        "acme",
    )
    assert broker.client.connection_pool.connection_kwargs["port"] == 6399


def test_broker_url_wins_over_redis_url_and_amqp_means_rabbitmq() -> None:
    broker = build_broker(
        settings(broker_url="amqp://guest:guest@127.0.0.1:5699/", redis_url="redis://127.0.0.1")
    )
    assert isinstance(broker, RabbitmqBroker)


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        settings(broker_url="kafka://127.0.0.1")


def test_retries_time_and_age_limits_are_bounded_by_the_settings() -> None:
    chosen = settings(
        job_max_retries=3,
        job_min_backoff=timedelta(seconds=2),
        job_max_backoff=timedelta(seconds=30),
        job_time_limit=timedelta(seconds=40),
        job_max_age=timedelta(hours=2),
    )
    broker = build_broker(chosen)
    by_type = {type(m): m for m in broker.middleware}
    assert (by_type[Retries].max_retries, by_type[Retries].min_backoff) == (3, 2000)
    assert by_type[Retries].max_backoff == 30_000
    assert by_type[TimeLimit].time_limit == 40_000
    assert by_type[AgeLimit].max_age == 7_200_000
    assert actor_options(chosen) == {
        "queue_name": QUEUE_NAME,
        "max_retries": 3,
        "min_backoff": 2000,
        "max_backoff": 30_000,
        "time_limit": 40_000,
        "max_age": 7_200_000,
    }


def test_the_actors_never_retry_permanent_errors() -> None:
    for actor in actors.ACTORS:
        throws = actor.options["throws"]
        assert issubclass(InvalidPayloadError, throws)
        assert issubclass(InvalidUsageError, throws)
        assert not issubclass(ProviderSyncError, throws)
        expected = actors.options_for(actor, actors.settings)["max_retries"]
        assert actor.options["max_retries"] == expected
    assert actors.sync_invoice.options["max_retries"] == actors.settings.sync_max_retries
    assert actors.aggregate_daily.options["max_retries"] == actors.settings.job_max_retries


def test_prometheus_is_added_only_when_asked_for() -> None:
    names = {type(m).__name__ for m in build_broker(settings()).middleware}
    assert "Prometheus" not in names
    names = {type(m).__name__ for m in build_broker(settings(prometheus=True)).middleware}
    assert "Prometheus" in names


def test_the_actors_module_built_its_broker_from_the_environment() -> None:
    # The test environment has no broker URL: the in-process broker, with our middleware.
    assert actors.broker is not None
    assert any(type(m).__name__ == "DeadLetterLog" for m in actors.broker.middleware)


# --- Redis, on fakeredis --------------------------------------------------------------------


def redis_broker(server, **fields) -> RedisBroker:
    client = fakeredis.FakeRedis(server=server)
    broker = build_broker(settings(**fields), redis_client=client)
    assert isinstance(broker, RedisBroker)
    broker.declare_queue(QUEUE_NAME)
    return broker


def message(n: int = 0) -> Message:
    return Message(
        queue_name=QUEUE_NAME,
        actor_name="billing.aggregate_daily",
        args=(n,),
        kwargs={},
        options={},
    )


def test_a_crashed_workers_message_is_requeued_by_the_first_command_after_the_heartbeat_timeout(
    monkeypatch,
) -> None:
    server = fakeredis.FakeServer()
    crashed = redis_broker(server, heartbeat_timeout=timedelta(seconds=30))
    crashed.enqueue(message())
    [fetched] = crashed.do_fetch(QUEUE_NAME, 1)  # taken, never acknowledged: the worker dies
    assert fetched

    survivor = redis_broker(server, heartbeat_timeout=timedelta(seconds=30))
    now = dramatiq_redis.current_millis()
    monkeypatch.setattr(dramatiq_redis, "current_millis", lambda: now + 29_000)
    assert survivor.do_fetch(QUEUE_NAME, 1) == []  # still within the timeout: not requeued
    monkeypatch.setattr(dramatiq_redis, "current_millis", lambda: now + 31_000)
    # The maintenance pass of this very command puts it back, and the fetch takes it.
    assert survivor.do_fetch(QUEUE_NAME, 1) == [fetched]


def test_with_dramatiqs_default_maintenance_chance_the_message_may_wait_much_longer(
    monkeypatch,
) -> None:
    server = fakeredis.FakeServer()
    crashed = redis_broker(server, maintenance_chance=1)  # 1 command in a million
    crashed.enqueue(message())
    crashed.do_fetch(QUEUE_NAME, 1)
    survivor = redis_broker(server, maintenance_chance=1)
    now = dramatiq_redis.current_millis()
    monkeypatch.setattr(dramatiq_redis, "current_millis", lambda: now + 31_000)
    monkeypatch.setattr(dramatiq_redis.random, "randint", lambda a, b: b)  # the unlucky draw
    assert all(survivor.do_fetch(QUEUE_NAME, 1) == [] for _ in range(20))


def test_a_worker_on_redis_runs_the_actors_and_acknowledges(
    session_factory, seeded, outbox
) -> None:
    server = fakeredis.FakeServer()
    chosen = settings(namespace="unit")
    broker = redis_broker(server, namespace="unit")
    previous = actors.attach(broker, settings=chosen)
    actors.bind(session_factory)
    worker = Worker(broker, worker_timeout=20, worker_threads=2)
    worker.start()
    try:
        seeded([("t1", 4, JAN)])
        actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
        broker.join(QUEUE_NAME, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        actors.unbind()
        actors.attach(previous, settings=actors.settings)
    assert [e["total"] for e in outbox("billing.usage_aggregated")] == [4]
    client = fakeredis.FakeRedis(server=server)
    assert client.hlen(f"unit:{QUEUE_NAME}.msgs") == 0  # acknowledged: nothing left behind


def test_a_repeated_sigterm_in_a_worker_process_does_not_kill_the_jobs_in_hand() -> None:
    import signal

    from workers.broker import OneShutdownPerSigterm

    calls = []
    original = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        OneShutdownPerSigterm().after_process_boot(build_broker(settings()))
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)  # from the process group
        handler(signal.SIGTERM, None)  # forwarded by dramatiq's main process
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)


def test_importing_billing_webhooks_or_workers_touches_no_broker() -> None:
    import subprocess
    import sys

    code = (
        "import sys, billing, billing.service, webhooks, webhooks.outbox, workers, workers.jobs; "
        "print('dramatiq.brokers' in sys.modules or 'dramatiq' in sys.modules and "
        "__import__('dramatiq').broker.global_broker is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
