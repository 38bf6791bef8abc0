"""Benchmark the billing workers on Redis and PostgreSQL against a bare Dramatiq no-op actor.

    python bench/bench_workers.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
                                  [--redis-url redis://127.0.0.1:6379/0]
                                  [--messages 20000] [--pairs 100000] [--threads 8]

Creates a scratch PostgreSQL database and a scratch Redis key namespace, measures, prints the
figures and ratios, and removes both. In one run, with one worker (1 process × `--threads`
threads, Dramatiq's own `Worker`, the billing middleware stack):

- a bare no-op actor: enqueue rate, then drain rate of `--messages` messages (with our
  `MAINTENANCE_CHANCE` of every command, and with Dramatiq's default of 1 in 1,000, to show what
  the bounded requeue time costs);
- `billing.aggregate_daily`: `--messages` messages, each a distinct (tenant, metric) with usage,
  each one transaction that upserts the aggregate and writes its outbox event on PostgreSQL;
- the scheduler's daily fan-out of `--pairs` (tenant, metric) pairs: the streamed query alone,
  then query plus enqueue to Redis, with the process's peak memory before and after.
"""

from __future__ import annotations

import argparse
import io
import resource
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import psycopg
import redis
from dramatiq import Worker
from scratch import scratch_database
from sqlalchemy import func, select

from billing.db import make_engine, make_session_factory
from billing.migrate import upgrade
from billing.models import UsageAggregate
from webhooks.models import WebhookEvent
from workers import actors, fanout
from workers.broker import QUEUE_NAME, build_broker
from workers.locks import LocalFireLock
from workers.scheduler import BillingScheduler
from workers.settings import WorkerSettings

JOB_DAY = datetime(2025, 1, 10, tzinfo=UTC)
FANOUT_DAY = datetime(2025, 1, 20, tzinfo=UTC)
NOOP_QUEUE = "bench_noop"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_pairs(url: str, day: datetime, pairs: int, prefix: str) -> None:
    """One usage event per (tenant, metric) pair on `day`, written with COPY."""
    buffer = io.StringIO()
    at = (day + timedelta(hours=3)).isoformat()
    for n in range(pairs):
        tenant, metric = f"{prefix}{n // 2:07d}", ("tokens", "calls")[n % 2]
        buffer.write(f"{uuid.uuid4()}\t{tenant}\t{metric}\t{n % 97 + 1}\t{at}\tk{n}\t{at}\n")
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        columns = "id, tenant_id, metric, amount, at_ts, idempotency_key, created_at"
        with cursor.copy(f"COPY usage_events ({columns}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())
        conn.commit()


def drain(broker: dramatiq.Broker, queue: str, threads: int) -> float:
    """Seconds for one worker with `threads` threads to process everything on `queue`."""
    worker = Worker(broker, queues={queue}, worker_threads=threads, worker_timeout=100)
    started = time.perf_counter()
    worker.start()
    try:
        broker.join(queue, timeout=600_000)
    finally:
        elapsed = time.perf_counter() - started
        worker.stop()
    return elapsed


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def bench_noop(settings: WorkerSettings, messages: int, threads: int) -> tuple[float, float]:
    broker = build_broker(settings)

    def noop(payload: dict[str, Any]) -> None:
        return None

    actor = dramatiq.actor(noop, actor_name="bench.noop", queue_name=NOOP_QUEUE, broker=broker)
    payload = {"tenant_id": "t", "metric": "tokens", "day_start": JOB_DAY.isoformat()}
    enqueue_s, _ = timed(lambda: [actor.send(payload) for _ in range(messages)])
    drain_s = drain(broker, NOOP_QUEUE, threads)
    broker.close()
    return messages / enqueue_s, messages / drain_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with scratch_database(args.admin_url) as url:
        try:
            run(url, namespace, args)
        finally:
            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])


def run(url: str, namespace: str, args: argparse.Namespace) -> None:
    engine = make_engine(url, pool_size=args.threads + 2)
    upgrade(engine)
    factory = make_session_factory(engine)
    settings = WorkerSettings(redis_url=args.redis_url, namespace=namespace)
    n, threads = args.messages, args.threads
    print(f"1 worker process × {threads} threads, Redis {args.redis_url}, PostgreSQL, {n} messages")

    enqueue_rate, noop_rate = bench_noop(settings, n, threads)
    default_chance = settings.model_copy(
        update={"namespace": f"{namespace}-dflt", "maintenance_chance": 1000}
    )
    _, noop_default_rate = bench_noop(default_chance, n, threads)
    print(f"no-op actor: enqueue {enqueue_rate:,.0f} msg/s; drain {noop_rate:,.0f} msg/s")
    ratio = noop_rate / noop_default_rate
    print(
        f"no-op actor with Dramatiq's default maintenance chance (1 in 1,000): drain "
        f"{noop_default_rate:,.0f} msg/s (ours, every command: {ratio:.2f}×)"
    )

    seed_pairs(url, JOB_DAY, n, "job")
    broker = build_broker(settings)
    previous = actors.attach(broker, settings=settings)
    actors.bind(factory)
    try:
        days = [JOB_DAY]
        scheduler = BillingScheduler(settings, factory, LocalFireLock())
        enqueue_s, sent = timed(lambda: scheduler.fan_out_days(days))
        drain_s = drain(broker, QUEUE_NAME, threads)
        with factory() as session:
            aggregates = session.execute(select(func.count()).select_from(UsageAggregate)).scalar()
            events = session.execute(select(func.count()).select_from(WebhookEvent)).scalar()
        if not sent == aggregates == events == n:
            raise SystemExit(f"lost work: sent {sent}, aggregates {aggregates}, events {events}")
        rate = n / drain_s
        print(
            f"billing.aggregate_daily: {rate:,.0f} jobs/s ({rate / noop_rate:.0%} of the no-op "
            f"actor); {n} aggregates and {n} outbox events in {drain_s:.1f} s"
        )

        seed_pairs(url, FANOUT_DAY, args.pairs, "fan")
        rss_before = peak_rss_mb()
        query_s, streamed = timed(
            lambda: sum(1 for _ in fanout.usage_pairs(factory, FANOUT_DAY, batch_size=1000))
        )
        fanout_s, fanned = timed(lambda: scheduler.fan_out_days([FANOUT_DAY]))
        rss_after = peak_rss_mb()
        if not streamed == fanned == args.pairs:
            raise SystemExit(f"fan-out mismatch: streamed {streamed}, sent {fanned}")
        broker.flush_all()
        payload = {"tenant_id": "t", "metric": "tokens", "day_start": FANOUT_DAY.isoformat()}
        raw_s, _ = timed(lambda: [actors.aggregate_daily.send(payload) for _ in range(args.pairs)])
        print(
            f"daily fan-out of {args.pairs:,} pairs: {fanout_s:.1f} s ({args.pairs / fanout_s:,.0f}"
            f" pairs/s); baseline, the same number of bare actor.send() calls: {raw_s:.1f} s "
            f"({fanout_s / raw_s:.2f}×); the streamed query alone {query_s:.2f} s; "
            f"peak RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after"
        )
    finally:
        broker.flush_all()
        actors.unbind()
        actors.attach(previous, settings=actors.settings)
        engine.dispose()


if __name__ == "__main__":
    main()
