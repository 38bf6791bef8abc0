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
  each one transaction that upserts the aggregate and writes its outbox event on PostgreSQL,
  against the fair baseline: a bare actor on the same broker doing the same aggregate upsert
  (`INSERT … SELECT SUM … ON CONFLICT`) from raw psycopg, one connection per worker thread, and
  committing. `--rounds` rounds (a fresh day each), interleaved: medians and ranges;
- the scheduler's daily fan-out of `--pairs` (tenant, metric) pairs: the streamed query alone,
  then query plus enqueue to Redis, with the process's peak memory before and after.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import psycopg
import redis
from dramatiq import Worker
from figures import Rounds, load
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
UPSERT_QUEUE = "bench_upsert"
RAW_AGGREGATE = (
    "INSERT INTO usage_aggregates AS a (id, tenant_id, metric, period_start, granularity, total, "
    "updated_at) SELECT %(id)s, %(tenant_id)s::text, %(metric)s::text, %(start)s, 'day', "
    "COALESCE(SUM(amount), 0), now() FROM usage_events WHERE tenant_id = %(tenant_id)s::text "
    "AND metric = %(metric)s::text AND at_ts >= %(start)s AND at_ts < %(end)s "
    "ON CONFLICT (tenant_id, metric, period_start, granularity, group_key) "
    "DO UPDATE SET total = excluded.total RETURNING total"
)
FANOUT_DAY = datetime(2025, 1, 20, tzinfo=UTC)
DAY = timedelta(days=1)
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


def count(factory: Any, model: Any) -> int:
    with factory() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


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


def bench_upsert(url: str, settings: WorkerSettings, payloads: list[dict[str, Any]], threads: int):
    """Drain rate of a bare actor doing one raw aggregate upsert per message, and committing."""
    broker = build_broker(settings)
    local = threading.local()
    connections: list[psycopg.Connection[Any]] = []

    def upsert(payload: dict[str, Any]) -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = psycopg.connect(url, autocommit=True)
            connections.append(connection)
        start = datetime.fromisoformat(payload["day_start"])
        params = {**payload, "id": str(uuid.uuid4()), "start": start, "end": start + DAY}
        with connection.transaction():
            connection.execute(RAW_AGGREGATE, params).fetchone()

    actor = dramatiq.actor(
        upsert, actor_name="bench.upsert", queue_name=UPSERT_QUEUE, broker=broker
    )
    for payload in payloads:
        actor.send(payload)
    seconds = drain(broker, UPSERT_QUEUE, threads)
    for connection in connections:
        connection.close()
    broker.close()
    return len(payloads) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
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

    broker = build_broker(settings)
    previous = actors.attach(broker, settings=settings)
    actors.bind(factory)
    try:
        scheduler = BillingScheduler(settings, factory, LocalFireLock())
        rounds = Rounds()
        for round_ in range(args.rounds):
            day = JOB_DAY + timedelta(days=round_)
            seed_pairs(url, day, n, f"job{round_}-")
            payloads = [
                {"tenant_id": tenant, "metric": metric, "day_start": day.isoformat()}
                for tenant, metric in fanout.usage_pairs(factory, day, batch_size=1000)
            ]
            upsert_rate = bench_upsert(url, settings, payloads, threads)
            rounds.rates.setdefault("bare actor, one raw upsert", []).append(upsert_rate)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE usage_aggregates")
            events_before = count(factory, WebhookEvent)
            sent = scheduler.fan_out_days([day])
            drain_s = drain(broker, QUEUE_NAME, threads)
            aggregates = count(factory, UsageAggregate)
            events = count(factory, WebhookEvent) - events_before
            if not sent == aggregates == events == n:
                raise SystemExit(
                    f"lost work: sent {sent}, aggregates {aggregates}, events {events}"
                )
            rounds.rates.setdefault("billing.aggregate_daily", []).append(n / drain_s)
            rounds.loads.append(os.getloadavg()[0])
            print(
                f"round {round_ + 1}: billing.aggregate_daily {n / drain_s:,.0f} jobs/s, bare "
                f"upsert actor {upsert_rate:,.0f}/s, no-op {noop_rate:,.0f}/s ({load()})"
            )
        rounds.report("billing.aggregate_daily", "bare actor, one raw upsert", 0.6)

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
