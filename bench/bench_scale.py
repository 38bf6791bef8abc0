"""Scale: ingest and aggregation on the monthly partitions of `usage_events` (PostgreSQL).

    python bench/bench_scale.py [--events 200000] [--months 6] [--tenants 1000]
                                [--batch 10000] [--sample 200]
                                [--admin-url postgresql://postgres@127.0.0.1/postgres]

In a scratch database (migrated, partitions made for the months first), `--events` events spread
over `--months` months and `--tenants` tenants are written in transactions of `--batch`: half by
`BillingService.record_usage_batch` (COPY-stage), half by the raw COPY-stage baseline of
`bench_billing.py` (the same claim-and-store SQL from raw psycopg), one batch each in turn, so
both pay for the same growing table and indexes. Printed: both rates over the first and the
last tenth of the run (does ingest slow down as the table grows?), then `aggregate_daily` on
`--sample` random (tenant, metric, day) pairs of the full table against the raw upsert, the
number of partitions a day's query reads (EXPLAIN: one, whatever the table holds), and the
size of each partition and of `usage_event_keys`. Figures are for this machine and its load,
which is printed. 1,000,000 events took 527 MiB here, so `--events 50000000` needs about 26 GB.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from bench_billing import RAW_AGGREGATE, RAW_COPY, RAW_COPY_TYPES, RAW_FROM_STAGE, RAW_STAGE
from figures import load, spread, timed
from psycopg.types.json import Json
from scratch import DEFAULT_ADMIN_URL, scratch_database

from billing import BillingService
from billing.db import make_engine, make_session_factory
from billing.partitions import ensure_partitions

START = datetime(2025, 1, 1, tzinfo=UTC)
METRICS = ("tokens", "calls")

Batch = tuple[str, list[dict[str, Any]]]


def batch_of(number: int, size: int, args: argparse.Namespace, prefix: str) -> Batch:
    """Batch `number`: one tenant's `size` events at random times in the months, with metadata."""
    rng = random.Random(number)
    span = (args.days - 1) * 86400
    events = [
        {
            "metric": METRICS[i % 2],
            "amount": rng.randint(1, 5000),
            "at": START + timedelta(seconds=rng.randrange(span)),
            "idempotency_key": f"{number}-{i}",
            "metadata": {"model": rng.choice(("small", "large"))},
        }
        for i in range(size)
    ]
    return f"{prefix}{number % args.tenants:05d}", events


def raw_copy_stage(raw: psycopg.Connection[Any], batch: Batch) -> None:
    """The baseline: COPY into a staging table, then the claim-and-store statement."""
    tenant, events = batch
    with raw.transaction(), raw.cursor() as cursor:
        cursor.execute(RAW_STAGE)
        with cursor.copy(RAW_COPY) as copy:
            copy.set_types(RAW_COPY_TYPES)
            for e in events:
                row = (str(uuid.uuid4()), tenant, e["metric"], e["amount"], e["at"])
                copy.write_row((*row, e["idempotency_key"], Json(e["metadata"])))
        cursor.execute(RAW_FROM_STAGE).fetchall()


def ingest(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Write the events, ours and raw in turn; the rate (events/s) of every batch of each."""
    factory = make_session_factory(make_engine(url))
    end = START + timedelta(days=args.days)
    rates: dict[str, list[float]] = {"ours": [], "raw": []}
    with psycopg.connect(url) as raw:
        for number in range(args.events // (2 * args.batch)):
            ours = batch_of(number, args.batch, args, "t")
            theirs = batch_of(number, args.batch, args, "r")

            def record(batch: Batch = ours) -> None:
                with factory.begin() as session:
                    service = BillingService(session=session, tenant_id=batch[0], now=lambda: end)
                    service.record_usage_batch(batch[1])

            rates["ours"].append(args.batch / timed(record))
            rates["raw"].append(args.batch / timed(lambda b=theirs: raw_copy_stage(raw, b)))
    return rates


def aggregate(url: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Milliseconds of `aggregate_daily` and of the raw upsert on random pairs, interleaved."""
    factory = make_session_factory(make_engine(url))
    rng = random.Random(7)
    ours: list[float] = []
    theirs: list[float] = []
    with psycopg.connect(url, autocommit=True) as raw:
        for _ in range(args.sample):
            tenant = f"t{rng.randrange(min(args.tenants, args.events // (2 * args.batch))):05d}"
            metric, day = rng.choice(METRICS), START + timedelta(days=rng.randrange(args.days))

            def ours_job(tenant: str = tenant, metric: str = metric, day: datetime = day) -> None:
                with factory.begin() as session:
                    BillingService(session=session, tenant_id=tenant).aggregate_daily(
                        metric=metric, day_start=day
                    )

            ours.append(timed(ours_job) * 1000)
            params = (str(uuid.uuid4()), f"r{tenant[1:]}", metric, day)
            query = (*params, f"r{tenant[1:]}", metric, day, day + timedelta(days=1))
            theirs.append(timed(lambda q=query: raw.execute(RAW_AGGREGATE, q).fetchone()) * 1000)
    return ours, theirs


def partitions_read(url: str) -> int:
    """How many partitions the plan of one day's sum reads."""
    with psycopg.connect(url) as conn:
        plan = conn.execute(
            "EXPLAIN SELECT sum(amount) FROM usage_events WHERE tenant_id = 't00001' "
            "AND metric = 'tokens' AND at_ts >= %s AND at_ts < %s",
            (START + timedelta(days=40), START + timedelta(days=41)),
        ).fetchall()
    return sum("usage_events_p" in line for (line,) in plan)


def sizes(url: str) -> dict[str, int]:
    """Bytes (with indexes) of each partition and of `usage_event_keys`."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "WHERE c.relname LIKE 'usage\\_events\\_%%' AND c.relkind = 'r' "
            "OR c.relname = 'usage_event_keys' ORDER BY 1"
        ).fetchall()
    return dict(rows)


def tenth(values: list[float], last: bool) -> list[float]:
    count = max(1, len(values) // 10)
    return values[-count:] if last else values[:count]


def report(label: str, work: Callable[[], object]) -> float:
    seconds = timed(work)
    print(f"{label}: {seconds:,.1f} s; {load()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=200)
    args = parser.parse_args()
    args.days = args.months * 30
    with scratch_database(args.admin_url, prefix="billing_scale") as url:
        with make_engine(url).begin() as conn:
            made = ensure_partitions(conn, now=START, ahead=args.months)
        print(f"{len(made)} monthly partitions from {START:%Y-%m}; {load()} at start")
        rates: dict[str, list[float]] = {}

        def run_ingest() -> None:
            rates.update(ingest(url, args))

        seconds = report(f"ingest of {args.events:,} events", run_ingest)
        summary: dict[str, object] = {"events": args.events, "ingest_seconds": seconds}
        for part, last in (("first tenth", False), ("last tenth", True)):
            ours, raw = tenth(rates["ours"], last), tenth(rates["raw"], last)
            ratio = statistics.median(ours) / statistics.median(raw)
            print(
                f"  {part}: record_usage_batch {spread(ours)}/s vs raw COPY-stage "
                f"{spread(raw)}/s, ratio {ratio:.2f}"
            )
            summary[part] = {"ours": statistics.median(ours), "raw": statistics.median(raw)}
        ours_ms, raw_ms = aggregate(url, args)
        print(
            f"aggregate_daily over {args.sample} random pairs: {spread(ours_ms, ',.1f')} ms vs "
            f"raw upsert {spread(raw_ms, ',.1f')} ms, ratio "
            f"{statistics.median(ours_ms) / statistics.median(raw_ms):.2f}; {load()}"
        )
        read = partitions_read(url)
        print(f"partitions read by one day's sum: {read}")
        table = sizes(url)
        for name, size in table.items():
            print(f"  {name}: {size / 2**20:,.1f} MiB")
        summary.update(
            aggregate_ms={"ours": statistics.median(ours_ms), "raw": statistics.median(raw_ms)},
            partitions_read=read,
            bytes=sum(table.values()),
        )
        print(json.dumps(summary))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - started:,.0f} s")
