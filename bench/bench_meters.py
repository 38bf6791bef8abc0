"""Each meter aggregation over N events of one day on PostgreSQL: aggregate_daily vs raw SQL.

    python bench/bench_meters.py [--admin-url postgresql://postgres@127.0.0.1/postgres]
                                 [--events 1000000] [--rounds 3] [--warmup 12]
                                 [--aggregations latest …]

One tenant's metric gets N events in one UTC day (amounts 0-999, 5,000 users in metadata, about
12 events at each second so that `latest` meets ties). For each aggregation the meter is
declared, then per round, interleaved: `BillingService.aggregate_daily` in its own transaction
(BEGIN; the locks with the tenant's zone and meter read, then the upsert; COMMIT: for `latest`
one statement, `billing_aggregate_day`, 3 round trips; for the others 4, the upsert a second
statement; on psycopg's cursor, `billing.driver_sql`),
the upsert statement it sends second alone (through SQLAlchemy, in a transaction),
and the raw baseline: the same `INSERT … SELECT <aggregate> … ON CONFLICT DO UPDATE` upsert
written by hand and sent with psycopg (autocommit). All must give the same total. For `latest`
the raw baseline reads max(at_ts) then the largest amount at it (two index lookups), and a
second one is the meter's own form, `ORDER BY at_ts DESC, amount DESC LIMIT 1` (measured as
fast: the index on (tenant, metric, at_ts) serves both). A third, "raw with the locks", sends
the raw upsert in a transaction after the call's two advisory locks (BEGIN; locks; upsert;
COMMIT: by hand, one round trip more than the call's `latest`). `latest`
takes milliseconds where the others scan the day, so the call's fixed round trips and commit,
not its SQL, are what separate aggregate_daily from the raw upsert there.
Each variant first runs `--warmup` times unmeasured, as a worker's long-lived connections have:
psycopg prepares a statement after 5 runs and PostgreSQL settles on a plan after 5 more, so
rounds taken from the start measure the raw baseline's and the call's planning (a cold start).
Prints per aggregation: median (range) milliseconds, the ratio to raw (goal <= 1.5x), load.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from figures import load, spread
from scratch import DEFAULT_ADMIN_URL, scratch_database

from billing import BillingService, aggregation
from billing.db import make_engine, make_session_factory
from billing.meters import declare_meter, get_meter
from billing.tenants import zone_lock_key

DAY = datetime(2025, 1, 15, tzinfo=UTC)
TENANT, METRIC = "bench", "m"
WHERE = "tenant_id = %(tenant)s AND metric = %(metric)s AND at_ts >= %(start)s AND at_ts < %(end)s"
RAW_QUANTITY = {
    "sum": f"SELECT COALESCE(SUM(amount), 0) FROM usage_events WHERE {WHERE}",
    "count": f"SELECT COUNT(*) FROM usage_events WHERE {WHERE}",
    "max": f"SELECT COALESCE(MAX(amount), 0) FROM usage_events WHERE {WHERE}",
    "unique_count": (
        f"SELECT COUNT(DISTINCT metadata_json ->> 'user') FROM usage_events WHERE {WHERE}"
    ),
    "latest": (
        "SELECT COALESCE(MAX(amount), 0) FROM usage_events WHERE tenant_id = %(tenant)s "
        "AND metric = %(metric)s AND at_ts = "
        f"(SELECT MAX(at_ts) FROM usage_events WHERE {WHERE})"
    ),
}
LATEST_SORTED = (
    f"SELECT COALESCE((SELECT amount FROM usage_events WHERE {WHERE} "
    "ORDER BY at_ts DESC, amount DESC LIMIT 1), 0)"
)
UPSERT = (
    "INSERT INTO usage_aggregates (id, tenant_id, metric, period_start, granularity, total, "
    "updated_at) SELECT %(id)s, %(tenant)s::varchar, %(metric)s::varchar, %(start)s, 'day', "
    "({quantity}), now() "
    "ON CONFLICT (tenant_id, metric, period_start, granularity, group_key) "
    "DO UPDATE SET total = excluded.total RETURNING total"
)
SEED = (
    "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, idempotency_key, "
    "metadata_json, created_at) SELECT gen_random_uuid()::text, %(tenant)s, %(metric)s, "
    "(g::bigint * 7919) %% 1000, "
    "%(start)s::timestamptz + ((g * 7) %% 86400) * interval '1 second', "
    "'e' || g, json_build_object('user', 'u' || (g %% 5000)), now() "
    "FROM generate_series(1, %(events)s) AS g"
)


#: The raw baseline with the call's transaction and locks, written by hand (psycopg, not
#: autocommit): BEGIN; the tenant's zone lock (shared) and the (tenant, metric) lock; the raw
#: upsert; COMMIT. What the call adds to it is its own overhead, not the race safety.
LOCKS = (
    "SELECT pg_advisory_xact_lock_shared(hashtextextended(%(zone_key)s, 0)), "
    "pg_advisory_xact_lock(hashtextextended(%(pair_key)s, 0))"
)

PAIRS = [
    ("aggregate_daily", "raw"),
    ("its upsert", "raw"),
    ("aggregate_daily", "raw with the locks"),
    ("aggregate_daily", "raw ORDER BY … LIMIT 1"),
]


def seed(raw: psycopg.Connection[Any], events: int) -> None:
    raw.execute(SEED, {"tenant": TENANT, "metric": METRIC, "start": DAY, "events": events})
    raw.execute("VACUUM ANALYZE usage_events")


def raw_upsert(raw: psycopg.Connection[Any], quantity: str) -> Callable[[], int]:
    statement = UPSERT.replace("{quantity}", quantity)
    params = {"tenant": TENANT, "metric": METRIC, "start": DAY, "end": DAY + timedelta(days=1)}

    def run() -> int:
        row = raw.execute(statement, {**params, "id": str(uuid.uuid4())}).fetchone()
        assert row is not None
        return int(row[0])

    return run


def raw_locked(locked: psycopg.Connection[Any], quantity: str) -> Callable[[], int]:
    """`raw_upsert` in a transaction of its own after the call's two advisory locks."""
    upsert = raw_upsert(locked, quantity)
    keys = {"zone_key": zone_lock_key(TENANT), "pair_key": f"billing.aggregate:{TENANT}:{METRIC}"}

    def run() -> int:
        locked.execute(LOCKS, keys)
        total = upsert()
        locked.commit()
        return total

    return run


def ours(factory: Any) -> Callable[[], int]:
    def run() -> int:
        with factory.begin() as session:
            service = BillingService(session=session, tenant_id=TENANT)
            return service.aggregate_daily(metric=METRIC, day_start=DAY)

    return run


def ours_statement(engine: Any) -> Callable[[], int]:
    """Only the upsert statement `aggregate_daily` sends (built by `billing.aggregation` for
    the declared meter), through SQLAlchemy in a transaction of its own."""
    with make_session_factory(engine)() as session:
        meter = get_meter(session, METRIC)
    statement = aggregation._upsert_statement("postgresql", meter)
    params = {
        "tenant_id": TENANT,
        "metric": METRIC,
        "start": DAY,
        "end": DAY + timedelta(days=1),
    }

    def run() -> int:
        with engine.begin() as connection:
            values = {**params, "id": str(uuid.uuid4()), "now": datetime.now(UTC)}
            return int(connection.execute(statement, values).scalar_one())

    return run


def measure(
    rounds: int, variants: dict[str, Callable[[], int]], warmup: int
) -> dict[str, list[float]]:
    """Milliseconds of each variant per round, interleaved, after `warmup` unmeasured rounds;
    every variant's total must agree."""
    times: dict[str, list[float]] = {label: [] for label in variants}
    totals = {work() for _ in range(warmup) for work in variants.values()}
    for _ in range(rounds):
        for label, work in variants.items():
            started = time.perf_counter()
            totals.add(work())
            times[label].append((time.perf_counter() - started) * 1000)
    assert len(totals) == 1, f"the variants disagree: {sorted(totals)}"
    return times


def report(kind: str, times: dict[str, list[float]]) -> None:
    for mine, label in PAIRS:
        if label not in times:
            continue
        ours_ms, base = times[mine], times[label]
        ratios = [o / b for o, b in zip(ours_ms, base, strict=True)]
        print(
            f"  {kind:<12} {mine} {spread(ours_ms, ',.1f')} ms vs {label} "
            f"{spread(base, ',.1f')} ms: ratio {spread(ratios, '.2f')} (goal <= 1.50); "
            f"median ratio {statistics.median(ratios):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--warmup",
        type=int,
        default=12,
        help="unmeasured rounds first, so statements are prepared and planned (0: a cold start)",
    )
    parser.add_argument(
        "--aggregations",
        nargs="+",
        choices=list(RAW_QUANTITY),
        default=list(RAW_QUANTITY),
        help="measure only these (`latest` takes milliseconds: give it many rounds alone)",
    )
    args = parser.parse_args()
    with scratch_database(args.admin_url, prefix="bench_meters") as url:
        engine = make_engine(url)
        factory = make_session_factory(engine)
        with psycopg.connect(url, autocommit=True) as raw, psycopg.connect(url) as locked:
            seed(raw, args.events)
            print(f"bench_meters: {args.events:,} events in one day, {load()}")
            for kind in args.aggregations:
                quantity = RAW_QUANTITY[kind]
                with factory.begin() as session:
                    prop = "user" if kind == "unique_count" else None
                    declare_meter(session, key=METRIC, aggregation=kind, property=prop)
                variants = {
                    "aggregate_daily": ours(factory),
                    "its upsert": ours_statement(engine),
                    "raw": raw_upsert(raw, quantity),
                    "raw with the locks": raw_locked(locked, quantity),
                }
                if kind == "latest":
                    variants["raw ORDER BY … LIMIT 1"] = raw_upsert(raw, LATEST_SORTED)
                report(kind, measure(args.rounds, variants, args.warmup))
            print(f"bench_meters: done, {load()}")
        engine.dispose()


if __name__ == "__main__":
    main()
