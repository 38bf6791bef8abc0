"""Benchmark the ledger on PostgreSQL against raw psycopg running the same SQL, in one run.

    python bench/bench_billing.py [--admin-url postgresql://postgres@127.0.0.1/postgres]
                                  [--single 3000] [--batch 100000] [--events 1000000]
                                  [--rounds 3]

A count of 0 skips its part (`--batch 0 --events 0`: single events only).

Creates a scratch database, migrates it, measures, prints figures and ratios, drops it. Each
variant runs once per round, interleaved with its baseline; figures are medians (ranges) of the
rounds, with the 1-minute load average. Every baseline writes the same table, with its
`usage_counters` trigger, and fetches what it inserted (RETURNING), as the ledger must.
- record_usage, one transaction per event   vs  raw single-row INSERT … ON CONFLICT: on an
  autocommit engine vs raw autocommit, and in BEGIN … COMMIT vs raw with commit()
- record_usage_batch, 1,000 events per transaction (one tenant each, 100 tenants, random times in
  a month, metadata)  vs  raw COPY into a temporary staging table then one INSERT … SELECT … ON
  CONFLICT (1,000 and 10,000 per transaction), and vs one INSERT … SELECT FROM unnest(arrays);
  and the same batches for 100 tenants in America/New_York  vs  those for the UTC tenants (the
  counters' trigger and the metric check cut local days and months)
- aggregate_daily over N events in one day  vs  the raw INSERT … SELECT SUM … ON CONFLICT upsert
  (and peak memory of the Python process, which must stay flat: events never leave PostgreSQL)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from figures import Rounds, load
from psycopg.types.json import Json
from raw_sql import claim_and_store
from scratch import scratch_database
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService
from billing.db import make_engine, make_session_factory
from billing.partitions import ensure_partitions
from billing.tenants import set_tenant

DAY = datetime(2025, 1, 1, tzinfo=UTC)
ZONE = "America/New_York"
MONTH_SECONDS = 31 * 86400
TENANTS = 100
BATCH = 1000
RAW_INSERT = claim_and_store(
    "SELECT %s::varchar AS id, %s::varchar AS tenant_id, %s::varchar AS metric, "
    "%s::bigint AS amount, %s::timestamptz AS at_ts, %s::varchar AS idempotency_key, "
    "%s::json AS metadata_json"
)
RAW_UNNEST = claim_and_store("""
SELECT u.id, %(tenant_id)s::varchar AS tenant_id, u.metric, u.amount, u.at_ts, u.idempotency_key,
       u.metadata_json
FROM unnest(%(ids)s::varchar[], %(metrics)s::varchar[], %(amounts)s::bigint[],
            %(ats)s::timestamptz[], %(keys)s::varchar[], %(metadata)s::json[])
     AS u(id, metric, amount, at_ts, idempotency_key, metadata_json)""")
RAW_STAGE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS bench_stage (id varchar, tenant_id varchar, "
    "metric varchar, amount bigint, at_ts timestamptz, idempotency_key varchar, "
    "metadata_json json) ON COMMIT DELETE ROWS"
)
RAW_COPY = "COPY bench_stage FROM STDIN (FORMAT BINARY)"
RAW_COPY_TYPES = ["varchar", "varchar", "varchar", "int8", "timestamptz", "varchar", "json"]
RAW_FROM_STAGE = claim_and_store("DELETE FROM bench_stage RETURNING *")
RAW_AGGREGATE = (
    "INSERT INTO usage_aggregates (id, tenant_id, metric, period_start, granularity, total, "
    "updated_at) SELECT %s, %s, %s, %s, 'day', COALESCE(SUM(amount), 0), now() "
    "FROM usage_events WHERE tenant_id = %s AND metric = %s AND at_ts >= %s AND at_ts < %s "
    "ON CONFLICT (tenant_id, metric, period_start, granularity, group_key) "
    "DO UPDATE SET total = excluded.total RETURNING total"
)

Event = dict[str, Any]


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(n: int, seed: int = 12) -> list[tuple[str, list[Event]]]:
    """`n` events in batches of 1,000 for 100 tenants in turn: random times, metadata."""
    rng = random.Random(seed)
    out = []
    for number, start in enumerate(range(0, n, BATCH)):
        events = [
            {
                "metric": ("tokens", "calls")[i % 2],
                "amount": rng.randint(1, 5000),
                "at": DAY + timedelta(seconds=rng.randrange(MONTH_SECONDS)),
                "idempotency_key": f"req-{i:09d}",
                "metadata": {"model": rng.choice(("small", "large")), "region": "eu-west"},
            }
            for i in range(start, min(n, start + BATCH))
        ]
        out.append((f"tenant-{number % TENANTS:03d}", events))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--single", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with scratch_database(args.admin_url) as url:
        run(url, args)


def run(url: str, args: argparse.Namespace) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:  # the month the events are in has its partition
        ensure_partitions(conn, now=DAY)
    factory = make_session_factory(engine)
    raw = psycopg.connect(url, autocommit=True)
    results: dict[str, object] = {}
    print(f"PostgreSQL ledger bench, {args.rounds} rounds; {load()} at start")

    def reset() -> None:
        raw.execute("TRUNCATE usage_events, usage_event_keys, usage_aggregates, usage_counters")
        raw.execute("VACUUM ANALYZE usage_events")

    if args.single:
        # 1. single events, one transaction each: an explicit BEGIN … COMMIT, and an autocommit
        #    engine (the statement is its own transaction: how an ingest endpoint can run it).
        n = args.single
        tx_raw = psycopg.connect(url)

        def raw_one_by_one(connection: psycopg.Connection[Any], commit: bool) -> Callable[[], None]:
            reset()
            tenant = uuid.uuid4().hex

            def work() -> None:
                for i in range(n):
                    connection.execute(
                        RAW_INSERT, (str(uuid.uuid4()), tenant, "tokens", 1, DAY, f"k{i}", None)
                    ).fetchone()
                    if commit:
                        connection.commit()

            return work

        def ours_one_by_one(session_factory: sessionmaker[Session]) -> Callable[[], None]:
            reset()
            tenant = uuid.uuid4().hex

            def work() -> None:
                for i in range(n):
                    with session_factory.begin() as session:
                        BillingService(session=session, tenant_id=tenant).record_usage(
                            metric="tokens", amount=1, at=DAY, idempotency_key=f"k{i}"
                        )

            return work

        autocommit_engine = make_engine(url, isolation_level="AUTOCOMMIT")
        autocommit_factory = make_session_factory(autocommit_engine)
        raw_one_by_one(raw, commit=False)()  # warm up the server and the statement caches
        ours_one_by_one(autocommit_factory)()
        single = Rounds()
        for _ in range(args.rounds):
            single.measure("record_usage, autocommit", n, ours_one_by_one(autocommit_factory))
            single.measure("raw autocommit INSERT", n, raw_one_by_one(raw, commit=False))
            single.measure("record_usage, BEGIN … COMMIT", n, ours_one_by_one(factory))
            single.measure("raw INSERT + commit()", n, raw_one_by_one(tx_raw, commit=True))
        results["single_autocommit"] = single.report(
            "record_usage, autocommit", "raw autocommit INSERT", 0.8
        )
        results["single_tx"] = single.report(
            "record_usage, BEGIN … COMMIT", "raw INSERT + commit()", 0.8
        )
        tx_raw.close()
        autocommit_engine.dispose()

    if args.batch:
        # 2. batches of 1,000 events per transaction, one tenant each, against the same work done
        #    by raw psycopg: COPY-stage (1,000 and 10,000 per transaction) and the unnest INSERT.
        work = batches(args.batch)
        n = sum(len(events) for _, events in work)
        stage = psycopg.connect(url)
        batch = Rounds()

        def ours_batches() -> None:
            for tenant, events in work:
                with factory.begin() as session:
                    BillingService(session=session, tenant_id=tenant).record_usage_batch(events)

        zoned = [(f"zoned-{tenant}", events) for tenant, events in work]
        with factory.begin() as session:
            for tenant in sorted({tenant for tenant, _ in zoned}):
                set_tenant(session, tenant, timezone=ZONE)

        def ours_zoned_batches() -> None:
            for tenant, events in zoned:
                with factory.begin() as session:
                    BillingService(session=session, tenant_id=tenant).record_usage_batch(events)

        def raw_unnest() -> None:
            for tenant, events in work:
                with stage.transaction():
                    stage.execute(RAW_UNNEST, unnest_params(tenant, events)).fetchall()

        def raw_copy_stage(per_transaction: int) -> Callable[[], None]:
            def run() -> None:
                for start in range(0, len(work), per_transaction // BATCH):
                    with stage.transaction(), stage.cursor() as cursor:
                        cursor.execute(RAW_STAGE)
                        with cursor.copy(RAW_COPY) as copy:
                            copy.set_types(RAW_COPY_TYPES)
                            for tenant, events in work[start : start + per_transaction // BATCH]:
                                for e in events:
                                    copy.write_row(
                                        (
                                            str(uuid.uuid4()),
                                            tenant,
                                            e["metric"],
                                            e["amount"],
                                            e["at"],
                                            e["idempotency_key"],
                                            Json(e["metadata"]),
                                        )
                                    )
                        cursor.execute(RAW_FROM_STAGE).fetchall()

            return run

        variants: list[tuple[str, Callable[[], None]]] = [
            ("record_usage_batch", ours_batches),
            ("raw COPY-stage 1k/txn", raw_copy_stage(1000)),
            ("raw COPY-stage 10k/txn", raw_copy_stage(10_000)),
            ("raw unnest INSERT", raw_unnest),
            (f"record_usage_batch, {ZONE} tenants", ours_zoned_batches),
        ]
        for _ in range(args.rounds):
            for label, variant in variants:
                reset()
                batch.measure(label, n, variant)
                check_stored(raw, n, work)
        results["batch_vs_copy"] = batch.report("record_usage_batch", "raw COPY-stage 1k/txn", 0.9)
        batch.report("record_usage_batch", "raw COPY-stage 10k/txn")
        batch.report("record_usage_batch", "raw unnest INSERT")
        results["zoned_vs_utc"] = batch.report(
            f"record_usage_batch, {ZONE} tenants", "record_usage_batch"
        )
        stage.close()

    if args.events:
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


def unnest_params(tenant: str, events: Sequence[Event]) -> dict[str, object]:
    return {
        "tenant_id": tenant,
        "ids": [str(uuid.uuid4()) for _ in events],
        "metrics": [e["metric"] for e in events],
        "amounts": [e["amount"] for e in events],
        "ats": [e["at"] for e in events],
        "keys": [e["idempotency_key"] for e in events],
        "metadata": [Json(e["metadata"]) for e in events],
    }


def check_stored(raw: psycopg.Connection[Any], n: int, work: Sequence[tuple[str, list[Event]]]):
    """Every variant must store the same rows and counters: n events, the same total."""
    expected = sum(e["amount"] for _, events in work for e in events)
    count, total, counted = raw.execute(
        "SELECT count(*), sum(amount), (SELECT sum(total) FROM usage_counters "
        "WHERE granularity = 'month') FROM usage_events"
    ).fetchone() or (0, 0, 0)
    if (count, total, counted) != (n, expected, expected):
        raise RuntimeError(f"stored {count} events, total {total}, counted {counted}")


if __name__ == "__main__":
    main()
