"""Benchmark the HTTP API against a bare FastAPI endpoint, and quota checks at 10,000,000 events.

    python bench/bench_api.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
                              [--duration 10] [--connections 4] [--rounds 3]
                              [--redis-url redis://127.0.0.1:6379/0] [--events 10000000]

Creates a scratch PostgreSQL database, migrates it, measures, prints figures and ratios, drops it.

1. POST /usage requests/s under uvicorn (1 worker, its own process), driven by a load generator
   of N processes with one keep-alive `http.client` connection each: `billing.app` (API key auth,
   idempotency middleware, validation, duplicate detection, BillingService) vs
   `bench/bare_usage_app.py` (the same INSERT on the same engine, nothing else), alternated for
   `--rounds` rounds. `billing.app` runs as deployed: with `REDIS_URL` (`--redis-url`, '' for
   none), so API keys are cached under Redis's revocation marker (a namespace of its own).
   Besides requests/s, the server process's CPU time per request (user + system, from /proc):
   the machine's load sways it far less than the rate, which waits on every other process.
2. Quota-check latency p50/p99 for a tenant with `--events` events in the current month
   (inserted by one `INSERT … SELECT generate_series`) vs a tenant with 10: `check_quota`
   (entitlement + counter read) and `consume_quota` (lock, record, commit), next to the scan a
   counter-less check would do (`SUM(amount)` over the month's events), and against the fair
   baseline: a raw psycopg read of the counter row (one indexed SELECT on a kept connection).
   The check's p50 over the raw read's p50 is printed as a ratio, for 3 rounds (median, range).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from figures import load, spread
from scratch import scratch_database
from sqlalchemy import text

from billing.api.keys import create_key
from billing.db import make_engine, make_session_factory
from billing.models import Plan, PlanEntitlement, Subscription
from billing.quotas import check_quota, consume_quota

BENCH_DIR = Path(__file__).resolve().parent


# --- servers and load ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def uvicorn_process(
    target: str, url: str, *extra: str, env_extra: dict[str, str] | None = None
) -> Iterator[tuple[int, int]]:
    """Run `uvicorn target` with one worker on a free loopback port; yield (port, pid)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, **(env_extra or {})}
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", "--log-level", "warning"]
    command += ["--no-access-log", *extra]
    process = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{target} did not start") from None
                time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def load_worker(
    port: int, path: str, headers: dict[str, str], seconds: float, tag: str, out
) -> None:
    """One connection sending POST /usage back to back until the time is up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        body = json.dumps({"metric": "tokens", "amount": 1, "idempotency_key": f"{tag}-{n}"})
        start = time.perf_counter()
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        response.read()
        latencies.append((time.perf_counter() - start) * 1000)
        statuses[response.status] = statuses.get(response.status, 0) + 1
        n += 1
    connection.close()
    out.put((latencies, statuses))


def drive(port: int, path: str, headers: dict[str, str], seconds: float, n: int) -> dict:
    """N load processes for `seconds`; requests/s and latency percentiles."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    run_id = uuid.uuid4().hex[:8]
    processes = [
        context.Process(
            target=load_worker,
            args=(port, path, headers, seconds, f"{run_id}-{i}", queue),
        )
        for i in range(n)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=seconds + 60) for _ in processes]
    for process in processes:
        process.join()
    latencies = sorted(x for lat, _ in results for x in lat)
    statuses: dict[int, int] = {}
    for _, counts in results:
        for status, count in counts.items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "statuses": statuses,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


# --- quota latency -------------------------------------------------------------------------


def timings(work: Callable[[], object], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        samples.append((time.perf_counter() - start) * 1000)
    return percentile(samples, 50), percentile(samples, 99)


def quota_bench(url: str, events: int, repeat: int) -> None:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    with sessions.begin() as session:
        plan = Plan(key="bench-plan", name="Bench")
        session.add(plan)
        session.flush()
        session.add(
            PlanEntitlement(plan_id=plan.id, key="tokens", window="month", limit_per_window=10**15)
        )
        for tenant in ("many", "few"):
            session.add(Subscription(tenant_id=tenant, plan_id=plan.id, effective_at=month_start))
    elapsed = max(1, int((now - month_start).total_seconds()))
    insert = text(
        "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, idempotency_key, "
        "created_at) SELECT gen_random_uuid()::text, :tenant, 'tokens', 1, "
        ":start + (i % :elapsed) * interval '1 second', 'gen-' || i, now() "
        "FROM generate_series(1, :n) AS i"
    )
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            insert, {"tenant": "many", "start": month_start, "elapsed": elapsed, "n": events}
        )
        conn.execute(insert, {"tenant": "few", "start": month_start, "elapsed": elapsed, "n": 10})
    load_seconds = time.perf_counter() - started
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE usage_events"))
        conn.execute(text("VACUUM ANALYZE usage_counters"))
    print(
        f"\nloaded {events:,} events in the month with INSERT … SELECT generate_series: "
        f"{load_seconds:.1f} s ({events / load_seconds:,.0f} rows/s, counters by trigger)"
    )

    def check(tenant: str) -> Callable[[], object]:
        def run() -> object:
            with sessions() as session:
                status = check_quota(
                    session, tenant_id=tenant, key="tokens", window="month", now=now
                )
                assert status is not None
                return status

        return run

    def consume(tenant: str) -> Callable[[], object]:
        def run() -> object:
            with sessions.begin() as session:
                return consume_quota(
                    session,
                    tenant_id=tenant,
                    key="tokens",
                    window="month",
                    amount=1,
                    now=datetime.now(UTC),
                )

        return run

    def scan() -> object:
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT coalesce(sum(amount), 0) FROM usage_events WHERE tenant_id = 'many' "
                    "AND metric = 'tokens' AND at_ts >= :start AND at_ts < :end"
                ),
                {"start": month_start, "end": now + timedelta(days=32)},
            ).scalar()

    raw = psycopg.connect(url, autocommit=True)

    def counter_row() -> object:
        row = raw.execute(
            "SELECT total FROM usage_counters WHERE tenant_id = %s AND metric = %s "
            "AND granularity = 'month' AND period_start = %s",
            ("many", "tokens", month_start),
        ).fetchone()
        assert row is not None
        return row

    with sessions() as session:
        used = check_quota(session, tenant_id="many", key="tokens", window="month", now=now)
        if used is None or used.used != events:
            raise RuntimeError(f"expected {events} units counted, got {used}")
    print(f"{'quota check (ms)':42} {'p50':>8} {'p99':>8}")
    rows = [
        (f"check_quota, {events:,} events in month", check("many"), repeat),
        ("check_quota, 10 events in month", check("few"), repeat),
        (f"consume_quota(1), {events:,} events", consume("many"), repeat // 2),
        ("consume_quota(1), 10 events", consume("few"), repeat // 2),
        (f"baseline: SUM over {events:,} events", scan, 5),
        ("baseline: raw read of the counter row", counter_row, repeat),
    ]
    results = {}
    for label, work, count in rows:
        work()  # warm up
        results[label] = timings(work, count)
        print(f"{label:42} {results[label][0]:8.3f} {results[label][1]:8.3f}")
    many, few = results[rows[0][0]][0], results[rows[1][0]][0]
    print(
        f"check p50 ratio {events:,} vs 10 events: {many / few:.2f}; "
        f"the scan a counter-less check would do is {results[rows[4][0]][0] / many:,.0f}x slower"
    )
    # The fair comparison: the check against reading its one counter row, in rounds.
    ratios = []
    for _ in range(3):
        check_p50 = timings(check("many"), repeat)[0]
        raw_p50 = timings(counter_row, repeat)[0]
        ratios.append(raw_p50 / check_p50)
        print(f"check_quota p50 {check_p50:.3f} ms vs raw counter read {raw_p50:.3f} ms ({load()})")
    print(
        f"check_quota speed / raw counter read: {spread(ratios, '.2f')} "
        f"(median (range) of {len(ratios)} rounds; 1.0 = as fast as the raw read)"
    )
    raw.close()
    engine.dispose()


# --- main ----------------------------------------------------------------------------------


def http_bench(url: str, seconds: float, connections: int, rounds: int, redis_url: str) -> None:
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        _, plaintext = create_key(session, tenant_id="bench", scopes=["billing.write"])
    engine.dispose()
    api_headers = {"Authorization": f"Bearer {plaintext}", "Content-Type": "application/json"}
    bare_headers = {"Content-Type": "application/json"}
    app_env = {"REDIS_URL": redis_url, "BROKER_NAMESPACE": f"bench-api-{uuid.uuid4().hex[:8]}"}
    print(
        f"POST /usage, uvicorn 1 worker, {connections} keep-alive connections "
        f"(one process each), {seconds:.0f} s per round, billing.app with "
        f"{'REDIS_URL (API keys cached)' if redis_url else 'no REDIS_URL (a key lookup each)'}"
    )
    print(f"{'server':28} {'req/s':>9} {'CPU µs/req':>10} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    rates: dict[str, list[float]] = {"billing.app": [], "bare FastAPI insert": []}
    cpu: dict[str, list[float]] = {name: [] for name in rates}
    for round_ in range(rounds):
        for name in rates:
            bare = name != "billing.app"
            target, extra, env = (
                ("bare_usage_app:app", ("--app-dir", str(BENCH_DIR)), {})
                if bare
                else ("billing.app:create_app", ("--factory",), app_env if redis_url else {})
            )
            path, headers = ("/usage", bare_headers) if bare else ("/_billing/usage", api_headers)
            with uvicorn_process(target, url, *extra, env_extra=env) as (port, pid):
                drive(port, path, headers, 1, connections)  # warm up
                before = cpu_seconds(pid)
                result = drive(port, path, headers, seconds, connections)
                used = cpu_seconds(pid) - before
            requests = result["rps"] * seconds
            rates[name].append(result["rps"])
            cpu[name].append(used / requests * 1e6)
            print(
                f"{name + f' (round {round_ + 1})':28} {result['rps']:9.0f} {cpu[name][-1]:10.0f} "
                f"{result['p50_ms']:8.2f} {result['p99_ms']:8.2f}  {result['statuses']} ({load()})"
            )
    api, bare = rates["billing.app"], rates["bare FastAPI insert"]
    ratios = [a / b for a, b in zip(api, bare, strict=True)]
    api_cpu, bare_cpu = cpu["billing.app"], cpu["bare FastAPI insert"]
    cpu_ratios = [b / a for a, b in zip(api_cpu, bare_cpu, strict=True)]
    print(
        f"billing.app / bare, req/s: {spread(ratios, '.2f')} "
        f"({spread(api)} vs {spread(bare)} req/s; median (range) of {rounds} rounds)"
    )
    print(
        f"bare / billing.app, server CPU per request: {spread(cpu_ratios, '.2f')} "
        f"({spread(api_cpu)} vs {spread(bare_cpu)} µs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-quota", action="store_true")
    args = parser.parse_args()

    with scratch_database(args.admin_url, "billing_bench_api") as url:
        if not args.skip_http:
            http_bench(url, args.duration, args.connections, args.rounds, args.redis_url)
        if not args.skip_quota:
            quota_bench(url, args.events, args.repeat)


if __name__ == "__main__":
    main()
