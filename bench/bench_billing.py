"""Benchmark the ledger on PostgreSQL against raw psycopg running the same SQL, in one run.

    python bench/bench_billing.py [--admin-url postgresql://postgres@127.0.0.1/postgres]
                                  [--single 3000] [--batch 100000] [--events 1000000]

Creates a scratch database, migrates it, measures, prints figures and ratios, drops it.
- record_usage, one transaction per event   vs  raw single-row INSERT … ON CONFLICT: on an
  autocommit engine vs raw autocommit, and in BEGIN … COMMIT vs raw with commit()
- record_usage_batch, 1,000 per transaction vs  raw psycopg executemany, 1,000 per transaction
- aggregate_daily over N events in one day  vs  the raw INSERT … SELECT SUM … ON CONFLICT upsert
  (and peak memory of the Python process, which must stay flat: events never leave PostgreSQL)
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
from scratch import scratch_database
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService
from billing.db import make_engine, make_session_factory

DAY = datetime(2025, 1, 1, tzinfo=UTC)
RAW_INSERT = (
    "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, idempotency_key, "
    "metadata_json, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now()) "
    "ON CONFLICT (tenant_id, metric, idempotency_key) DO NOTHING RETURNING id"
)
RAW_AGGREGATE = (
    "INSERT INTO usage_aggregates (id, tenant_id, metric, period_start, granularity, total, "
    "updated_at) SELECT %s, %s, %s, %s, 'day', COALESCE(SUM(amount), 0), now() "
    "FROM usage_events WHERE tenant_id = %s AND metric = %s AND at_ts >= %s AND at_ts < %s "
    "ON CONFLICT (tenant_id, metric, period_start, granularity) "
    "DO UPDATE SET total = excluded.total RETURNING total"
)


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--single", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()

    with scratch_database(args.admin_url) as url:
        run(url, args)


def run(url: str, args: argparse.Namespace) -> None:
    engine = make_engine(url)
    factory = make_session_factory(engine)
    raw = psycopg.connect(url, autocommit=True)
    results: dict[str, object] = {}

    def reset() -> None:
        raw.execute("TRUNCATE usage_events, usage_aggregates")
        raw.execute("VACUUM ANALYZE usage_events")

    # 1. single events, one transaction each: an explicit BEGIN … COMMIT, and an autocommit
    #    engine (the statement is its own transaction: how an ingest endpoint can run it).
    n = args.single
    tx_raw = psycopg.connect(url)

    def raw_one_by_one(connection: psycopg.Connection[object], commit: bool) -> float:
        reset()
        tenant = uuid.uuid4().hex

        def work() -> None:
            for i in range(n):
                connection.execute(
                    RAW_INSERT, (str(uuid.uuid4()), tenant, "tokens", 1, DAY, f"k{i}", None)
                ).fetchone()
                if commit:
                    connection.commit()

        return n / timed(work)

    def ours_one_by_one(session_factory: sessionmaker[Session]) -> float:
        reset()
        tenant = uuid.uuid4().hex

        def work() -> None:
            for i in range(n):
                with session_factory.begin() as session:
                    BillingService(session=session, tenant_id=tenant).record_usage(
                        metric="tokens", amount=1, at=DAY, idempotency_key=f"k{i}"
                    )

        return n / timed(work)

    autocommit_engine = make_engine(url, isolation_level="AUTOCOMMIT")
    autocommit_factory = make_session_factory(autocommit_engine)
    raw_one_by_one(raw, commit=False)  # warm up the server and the statement caches
    ours_one_by_one(autocommit_factory)
    report(
        results,
        "record_usage, autocommit engine (1 event/statement)",
        ours_one_by_one(autocommit_factory),
        raw_one_by_one(raw, commit=False),
        0.70,
    )
    report(
        results,
        "record_usage, BEGIN … COMMIT per event",
        ours_one_by_one(factory),
        raw_one_by_one(tx_raw, commit=True),
        0.70,
    )
    tx_raw.close()
    autocommit_engine.dispose()

    # 2. batches of 1,000 events per transaction
    n = args.batch
    reset()

    def raw_batches() -> None:
        for start in range(0, n, 1000):
            rows = [
                (str(uuid.uuid4()), "raw", "tokens", 1, DAY, f"b{i}", None)
                for i in range(start, start + 1000)
            ]
            with raw.transaction(), raw.cursor() as cursor:
                cursor.executemany(RAW_INSERT.replace(" RETURNING id", ""), rows)

    raw_batch = n / timed(raw_batches)

    def ours_batches() -> None:
        for start in range(0, n, 1000):
            events = [
                {"metric": "tokens", "amount": 1, "at": DAY, "idempotency_key": f"b{i}"}
                for i in range(start, start + 1000)
            ]
            with factory.begin() as session:
                BillingService(session=session, tenant_id="ours").record_usage_batch(events)

    reset()
    ours_batch = n / timed(ours_batches)
    report(results, "record_usage_batch (1,000/transaction)", ours_batch, raw_batch, 0.85)

    # 3. aggregate one (tenant, metric, day) holding N events
    reset()
    raw.execute(
        "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, idempotency_key, "
        "created_at) SELECT gen_random_uuid()::text, 't1', 'tokens', 1 + g %% 7, "
        "%s::timestamptz + (g %% 86400) * interval '1 second', 'e' || g, now() "
        "FROM generate_series(1, %s) AS g",
        (DAY, args.events),
    )
    raw.execute("VACUUM ANALYZE usage_events")
    rss_before = peak_rss_mb()
    end = DAY + timedelta(days=1)
    raw_agg = median_of(
        3,
        lambda: raw.execute(
            RAW_AGGREGATE, (str(uuid.uuid4()), "t1", "tokens", DAY, "t1", "tokens", DAY, end)
        ).fetchone(),
    )

    def ours_agg() -> None:
        with factory.begin() as session:
            BillingService(session=session, tenant_id="t1").aggregate_daily(
                metric="tokens", day_start=DAY
            )

    ours_agg_time = median_of(3, ours_agg)
    with engine.connect() as conn:
        total = conn.execute(text("SELECT total FROM usage_aggregates")).scalar_one()
    print(
        f"aggregate_daily over {args.events:,} events: ours {ours_agg_time * 1000:.0f} ms, "
        f"raw {raw_agg * 1000:.0f} ms, ratio {ours_agg_time / raw_agg:.2f}x "
        f"(goal <= 1.5x); total {total:,}; peak RSS {rss_before:.0f} -> {peak_rss_mb():.0f} MB"
    )
    results["aggregate_ms"] = {"ours": ours_agg_time * 1000, "raw": raw_agg * 1000}
    print(json.dumps(results))
    raw.close()
    engine.dispose()


def median_of(times: int, work: Callable[[], object]) -> float:
    return sorted(timed(work) for _ in range(times))[times // 2]


def report(results: dict[str, object], label: str, ours: float, raw: float, goal: float) -> None:
    ratio = ours / raw
    print(
        f"{label}: ours {ours:,.0f}/s, raw psycopg {raw:,.0f}/s, ratio {ratio:.0%} "
        f"(goal >= {goal:.0%})"
    )
    results[label] = {"ours_per_s": round(ours), "raw_per_s": round(raw), "ratio": round(ratio, 3)}


if __name__ == "__main__":
    main()
