"""What MAX_METRICS_PER_TENANT costs recording usage of metrics a month already has (PostgreSQL).

    python bench/bench_metric_limit.py [--admin-url postgresql://postgres@127.0.0.1/postgres]
                                       [--single 2000] [--batches 50] [--rounds 3]

The same events recorded with the limit (the default, 1,000) and without it
(`max_metrics_per_tenant=None`, the raw baseline: the ledger's insert alone), interleaved per
round: one event per transaction, and batches of 1,000 events over 100 known metrics. Every
metric exists in the month before the run, so this is the hot path: one primary-key lookup in
`usage_counters` per call, no lock. Prints medians (ranges), ratios and the load average.
"""

from __future__ import annotations

import argparse
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from figures import Rounds, load
from scratch import DEFAULT_ADMIN_URL, scratch_database
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService
from billing.db import make_engine, make_session_factory

AT = datetime(2025, 1, 15, tzinfo=UTC)
METRICS = [f"metric-{i}" for i in range(100)]
TENANT = "bench"
_keys = itertools.count()


def event(metric: str) -> dict[str, Any]:
    at = AT + timedelta(seconds=next(_keys) % 86400)
    return {"metric": metric, "amount": 1, "at": at, "idempotency_key": f"k{next(_keys)}"}


def service(session: Session, limited: bool) -> BillingService:
    limit = 1000 if limited else None
    return BillingService(session=session, tenant_id=TENANT, max_metrics_per_tenant=limit)


def singles(factory: sessionmaker[Session], count: int, limited: bool) -> None:
    for n in range(count):
        with factory.begin() as session:
            service(session, limited).record_usage(**event(METRICS[n % len(METRICS)]))


def batches(factory: sessionmaker[Session], count: int, limited: bool) -> None:
    for _ in range(count):
        with factory.begin() as session:
            batch = [event(METRICS[n % len(METRICS)]) for n in range(1000)]
            service(session, limited).record_usage_batch(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with scratch_database(args.admin_url, prefix="bench_metric_limit") as url:
        engine = make_engine(url)
        factory = make_session_factory(engine)
        with factory.begin() as session:  # every metric known in the month
            service(session, False).record_usage_batch([event(m) for m in METRICS])
        rounds = Rounds()
        print(f"bench_metric_limit: {load()}")
        for _ in range(args.rounds):
            rounds.measure(
                "single, limit", args.single, lambda: singles(factory, args.single, True)
            )
            rounds.measure(
                "single, no limit", args.single, lambda: singles(factory, args.single, False)
            )
            events = args.batches * 1000
            rounds.measure("batch, limit", events, lambda: batches(factory, args.batches, True))
            rounds.measure("batch, no limit", events, lambda: batches(factory, args.batches, False))
        rounds.report("single, limit", "single, no limit")
        rounds.report("batch, limit", "batch, no limit")
        engine.dispose()


if __name__ == "__main__":
    main()
