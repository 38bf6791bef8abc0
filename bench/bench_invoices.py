"""Benchmark the monthly invoice run: `--tenants` invoices through Redis to the Procfile's worker.

    python bench/bench_invoices.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
                                   [--redis-url redis://127.0.0.1:6379/0]
                                   [--tenants 10000] [--rounds 3] [--threads 8]
                                   [--processes 1 2] [--in-process N] [--previous-month]

Creates a scratch PostgreSQL database and Redis namespace, removed at the end. Each of the
`--tenants` tenants subscribes to one plan (a monthly fee, a per-token price finer than a cent,
a per-call price) and used both metrics in January. Per round, for 1 and then 2 worker
processes of `--threads` threads (the Procfile's `dramatiq workers.actors` line, its own
processes): the invoices and their events are emptied, the scheduler's monthly fan-out sends
one `billing.generate_monthly_invoice` per tenant, the workers start, and the run ends when
every invoice is stored. Printed per configuration: invoices per second while the workers ran
(first to last invoice stored; process start-up excluded), the wall time from the first
message, and that rate extrapolated to 100,000 tenants, against the goal of 5 minutes with 1
process. Medians and ranges of the rounds, with the machine's load.

The baseline, measured before and after the runs: numbered commits per second, one after
another on one raw psycopg connection (the sequence's upsert `… RETURNING` and its COMMIT in
one round trip, as `billing.numbering` sends an invoice's; each waits for its WAL flush).
Invoice numbers are gapless across tenants, so each finalizing transaction holds the
sequence's row until its commit is on disk and the next one waits for it: a run of numbered
invoices, whatever its workers, can hardly exceed that rate. It moves with the disk's flush
time (2-4 ms on this machine, varying through the day): the ratio of a run's rate to it is
what compares across days.

With `--in-process N`, first: N of those jobs run one after another in this process (no
broker, one connection), printing per invoice job the CPU time of this process (the worker's
Python: SQLAlchemy, pricing, payloads) and of the PostgreSQL backend serving it, and the
statements sent. CPU time is less swayed by the machine's load than a rate is.

With `--previous-month`, every tenant also has a finalized December invoice (its fee, its
usage lines at 0) that the late-usage lookback covers, as last month's invoice is in a real
monthly run (`LATE_USAGE_LOOKBACK`, 35 days, is stretched to reach December 2024): each job
re-prices it for late usage before it invoices January.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import redis
from figures import load, spread
from scratch import scratch_database
from sqlalchemy import event, func, select, text

from billing.db import make_engine, make_session_factory
from billing.lifecycle import DEFAULT_POLICY, InvoicePolicy
from billing.models import Invoice, Plan, Price
from workers import actors
from workers.broker import build_broker
from workers.jobs import generate_monthly_invoice_job
from workers.locks import LocalFireLock
from workers.scheduler import BillingScheduler
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
GOAL_SECONDS = 300
AT_SCALE = 100_000
DEC = datetime(2024, 12, 1, tzinfo=UTC)
#: January's invoices, lines and numbers, and every event; December's invoices stay.
RESET = (
    "DELETE FROM invoice_lines USING invoices WHERE invoices.id = invoice_lines.invoice_id"
    " AND invoices.period_start = '2025-01-01T00:00:00Z';"
    " DELETE FROM invoices WHERE period_start = '2025-01-01T00:00:00Z';"
    " TRUNCATE webhook_events, webhook_deliveries, number_sequences CASCADE"
)
#: Each tenant's December invoice, finalized (numbered apart from the sequence), with a line
#: per price of the plan: the fee, and usage lines at 0.
PREVIOUS_MONTH = (
    """
    INSERT INTO invoices (id, tenant_id, period_start, period_end, status, total_amount,
                          currency, created_at, number, finalized_at)
    SELECT gen_random_uuid()::text, tenant_id, %(dec)s, %(jan)s, 'open', 2900, 'usd', %(jan)s,
           'DEC-' || lpad((row_number() OVER (ORDER BY tenant_id))::text, 7, '0'), %(jan)s
    FROM subscriptions
    """,
    """
    INSERT INTO invoice_lines (id, invoice_id, price_id, metric, quantity, amount, created_at,
                               kind)
    SELECT gen_random_uuid()::text, invoices.id, prices.id, prices.metric,
           CASE WHEN prices.metric IS NULL THEN 1 ELSE 0 END,
           CASE WHEN prices.metric IS NULL THEN prices.unit_amount ELSE 0 END, %(jan)s, 'charge'
    FROM invoices CROSS JOIN prices WHERE invoices.period_start = %(dec)s
    """,
)


def lookback() -> timedelta:
    """A `LATE_USAGE_LOOKBACK` that reaches December 2024's invoices from now."""
    return datetime.now(UTC) - FEB + timedelta(days=35)


def invoice_previous_month(url: str) -> None:
    with psycopg.connect(url) as conn:
        for statement in PREVIOUS_MONTH:
            conn.execute(statement, {"dec": DEC, "jan": JAN})


def seed(url: str, tenants: int) -> None:
    """The plan, one subscription per tenant (COPY) and two usage events each (COPY)."""
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        plan = Plan(key="bench", name="Bench")
        session.add(plan)
        session.flush()
        session.add_all(
            [
                Price(plan_id=plan.id, key="fee", currency="usd", unit_amount=2900,
                      recurring_interval="month", billing_scheme="per_unit"),
                Price(plan_id=plan.id, key="tokens", currency="usd", metric="tokens",
                      unit_amount_decimal=Decimal("0.0002"), billing_scheme="per_unit"),
                Price(plan_id=plan.id, key="calls", currency="usd", metric="calls",
                      unit_amount=1, billing_scheme="per_unit"),
            ]
        )  # fmt: skip
        plan_id = plan.id
    engine.dispose()
    subscriptions, events = io.StringIO(), io.StringIO()
    since = (JAN - timedelta(days=40)).isoformat()
    for n in range(tenants):
        tenant = f"t{n:07d}"
        subscriptions.write(f"{uuid.uuid4()}\t{tenant}\t{plan_id}\t{since}\t{since}\n")
        for metric, amount in (("tokens", 1000 + n % 997), ("calls", n % 53 + 1)):
            at = (JAN + timedelta(days=n % 28, minutes=n % 1440)).isoformat()
            events.write(f"{uuid.uuid4()}\t{tenant}\t{metric}\t{amount}\t{at}\tk-{n}\t{at}\n")
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        columns = "id, tenant_id, plan_id, effective_at, created_at"
        with cursor.copy(f"COPY subscriptions ({columns}) FROM STDIN") as copy:
            copy.write(subscriptions.getvalue())
        columns = "id, tenant_id, metric, amount, at_ts, idempotency_key, created_at"
        with cursor.copy(f"COPY usage_events ({columns}) FROM STDIN") as copy:
            copy.write(events.getvalue())
        conn.commit()
        conn.execute("ANALYZE")


def start_workers(
    url: str, redis_url: str, namespace: str, processes: int, threads: int, previous: bool
):
    """The Procfile's worker line, with its own process group."""
    env = {
        **os.environ,
        **({"LATE_USAGE_LOOKBACK": str(lookback().total_seconds())} if previous else {}),
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "BROKER_NAMESPACE": namespace,
        "PROMETHEUS_MULTIPROC_DIR": os.environ.get("PROMETHEUS_MULTIPROC_DIR", "/tmp/bench-m"),
    }
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    command = [sys.executable, "-m", "dramatiq", "workers.actors"]
    command += ["--processes", str(processes), "--threads", str(threads)]
    return subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=sys.stderr
    )


def one_run(
    url: str, args: argparse.Namespace, namespace: str, processes: int
) -> tuple[float, float]:
    """(invoices/s while running, wall seconds from the first message) of one run."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(RESET)
    settings = WorkerSettings(redis_url=args.redis_url, namespace=namespace)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    broker = build_broker(settings)
    previous = actors.attach(broker, settings=settings)
    try:
        started = time.perf_counter()
        sent = BillingScheduler(settings, factory, LocalFireLock()).fan_out_invoices(JAN, FEB)
        if sent != args.tenants:
            raise SystemExit(f"fan-out sent {sent}, expected {args.tenants}")
        workers = start_workers(
            url, args.redis_url, namespace, processes, args.threads, args.previous_month
        )
        try:
            deadline = time.monotonic() + 3600
            while count(factory) < args.tenants:
                if workers.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the workers stopped before the run ended")
                time.sleep(0.2)
            wall = time.perf_counter() - started
        finally:
            os.killpg(workers.pid, signal.SIGTERM)
            workers.wait(timeout=60)
        with factory() as session:
            first, last = session.execute(
                select(func.min(Invoice.created_at), func.max(Invoice.created_at)).where(
                    Invoice.period_start == JAN
                )
            ).one()
        return (args.tenants - 1) / (last - first).total_seconds(), wall
    finally:
        actors.attach(previous, settings=actors.settings)
        broker.close()
        engine.dispose()


def in_process(url: str, jobs: int, previous: bool) -> None:
    """`jobs` invoice jobs in this process, one after another: CPU and statements per job.

    The jobs are timed without an event listener on the engine (one makes `billing.driver_sql`
    take SQLAlchemy's path); the statements are counted on the last job, with one."""
    policy = InvoicePolicy(late_usage_lookback=lookback()) if previous else DEFAULT_POLICY
    engine = make_engine(url)
    factory = make_session_factory(engine)

    def backend_cpu() -> tuple[float, int]:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with open(f"/proc/{pid}/stat") as stat:  # the server runs on this machine
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), pid

    payloads = [
        {"tenant_id": f"t{n:07d}", "period_start": JAN.isoformat(),
         "period_end": FEB.isoformat(), "currency": "usd"}
        for n in range(jobs)
    ]  # fmt: skip
    first, timed, counted = payloads[0], payloads[1:-1], payloads[-1]
    try:
        generate_monthly_invoice_job(factory, first, policy=policy)  # connect, warm up
        server, pid = backend_cpu()
        cpu = time.process_time()
        for payload in timed:
            generate_monthly_invoice_job(factory, payload, policy=policy)
        cpu, n = time.process_time() - cpu, len(timed)
        server_after, same = backend_cpu()
        server_cpu = f"{(server_after - server) / n * 1000:.2f} ms" if same == pid else "unknown"
        sent: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
        generate_monthly_invoice_job(factory, counted, policy=policy)
        print(
            f"in process, {n:,} invoice jobs one after another"
            f"{' (each re-pricing December)' if previous else ''}: {cpu / n * 1000:.2f} ms of "
            f"this process's CPU and {server_cpu} of the PostgreSQL backend's per job, "
            f"{len(sent)} statements per job ({load()})"
        )
    finally:
        engine.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(RESET)


def count(factory) -> int:
    with factory() as session:
        january = select(func.count()).select_from(Invoice).where(Invoice.period_start == JAN)
        return int(session.execute(january).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2], help="worker processes to run"
    )
    parser.add_argument(
        "--in-process", type=int, default=0, help="first run this many jobs in this process"
    )
    parser.add_argument(
        "--previous-month",
        action="store_true",
        help="each tenant's December invoice is in the late-usage lookback (re-priced each job)",
    )
    args = parser.parse_args()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        with scratch_database(args.admin_url) as url:
            seed(url, args.tenants)
            if args.previous_month:
                invoice_previous_month(url)
            if args.in_process:
                in_process(url, min(args.in_process, args.tenants), args.previous_month)
            if args.rounds:
                run(url, args, namespace)
    finally:
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


#: The ceiling's statement: a sequence of its own, incremented as `billing.numbering` does.
CEILING = (
    "INSERT INTO number_sequences (name, last_value) VALUES ('bench_ceiling', 1) "
    "ON CONFLICT (name) DO UPDATE SET last_value = number_sequences.last_value + 1 "
    "RETURNING last_value"
)


def numbered_commits_per_second(url: str, seconds: float = 3.0) -> float:
    """Numbered commits per second, one after another on one raw connection (see above), each
    statement sent with its COMMIT in one round trip (a pipeline), as an invoice's is."""
    with psycopg.connect(url) as connection:
        cursor = connection.cursor()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            with connection.pipeline():
                cursor.execute(CEILING)
                connection.commit()
            cursor.fetchone()
            done += 1
        rate = done / (time.perf_counter() - started)
        connection.execute("DELETE FROM number_sequences WHERE name = 'bench_ceiling'")
        connection.commit()
    return rate


def run(url: str, args: argparse.Namespace, namespace: str) -> None:
    previous = ", each tenant's December invoice re-priced" if args.previous_month else ""
    print(
        f"monthly invoice run, {args.tenants:,} tenants{previous}, PostgreSQL and Redis, {load()}"
    )
    rates: dict[int, list[float]] = {n: [] for n in args.processes}
    walls: dict[int, list[float]] = {n: [] for n in args.processes}
    ceilings = [numbered_commits_per_second(url)]
    for round_ in range(args.rounds):
        for processes in args.processes:
            rate, wall = one_run(url, args, namespace, processes)
            rates[processes].append(rate)
            walls[processes].append(wall)
            print(
                f"round {round_ + 1}, {processes} × {args.threads}: {rate:,.0f} invoices/s, "
                f"{wall:.1f} s from the first message ({load()})"
            )
    ceilings.append(numbered_commits_per_second(url))
    ceiling = statistics.median(ceilings)
    print(
        f"baseline: numbered commits one after another {spread(ceilings)}/s before and after "
        f"the runs (a flush of the disk takes {1000 / ceiling:.1f} ms)"
    )
    for processes in args.processes:
        median_rate = sorted(rates[processes])[len(rates[processes]) // 2]
        at_scale = AT_SCALE / median_rate
        print(
            f"{processes} × {args.threads}: {spread(rates[processes])} invoices/s, wall "
            f"{spread(walls[processes], '.1f')} s for {args.tenants:,}; {AT_SCALE:,} tenants "
            f"≈ {at_scale / 60:.1f} min (goal with 1 process: {GOAL_SECONDS / 60:.0f} min, "
            f"{AT_SCALE / GOAL_SECONDS:,.0f}/s); ratio to the baseline "
            f"{median_rate / ceiling:.2f}"
        )


if __name__ == "__main__":
    main()
