"""Benchmark webhook delivery on PostgreSQL against raw httpx posting the same bodies, in one run.

    python bench/bench_webhooks.py [--admin-url postgresql://postgres@127.0.0.1/postgres]
                                   [--events 10000] [--concurrency 16] [--latency-samples 200]
                                   [--max-in-flight-per-subscription 2]

Creates a scratch database, starts a local subscriber process (bench/webhook_receiver.py, which
verifies every delivery) and a relay process (`python -m webhooks.relay`), then prints:
- raw httpx, the fair baseline: one thread and one `httpx.Client` posting the same bodies,
  each built and signed inside the timed loop (as the relay does); and, for reference, the
  same with as many threads as the relay's concurrency sharing one pooled Client;
- the relay: N events published in one transaction, deliveries/s from the commit to the last
  arrival at the subscriber, and until every row is marked delivered; the ratio to raw. All go
  to one subscription, so the relay's cap on one subscription's slots in flight
  (`WEBHOOKS_MAX_IN_FLIGHT_PER_SUBSCRIPTION`, default 2, over every relay) allows 2 requests
  at once: each slot holds a chain of the subscription's deliveries, sent one after another
  and fed from the slot as it runs low. `--max-in-flight-per-subscription 10000` measures the
  relay with the cap out of the way (as many subscriptions sharing the load would);
- commit-to-delivery latency for single events on an idle system (p50, p99, max), the relay
  woken by LISTEN/NOTIFY.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from figures import load
from scratch import scratch_database
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from billing.db import make_engine
from webhooks import publish
from webhooks.delivery import event_body
from webhooks.models import WebhookDelivery
from webhooks.secrets import generate_secret
from webhooks.signing import signature_headers
from webhooks.subscriptions import SqlWebhookSubscriptions

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "billing.usage_aggregated"


def payload(i: int) -> dict[str, object]:
    return {
        "tenant_id": f"tenant-{i % 50}",
        "metric": "tokens",
        "day_start": "2025-01-01T00:00:00+00:00",
        "total": 1_000_000 + i,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


class Receiver:
    def __init__(self, secret: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "webhook_receiver.py"), str(self.port), secret],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}")

    def count(self) -> int:
        return int(self.client.get("/count").json()["count"])

    def rejected(self) -> int:
        return int(self.client.get("/count").json()["rejected"])

    def dump(self) -> list[tuple[str, float]]:
        return [(i, t) for i, t in self.client.get("/dump").json()]

    def close(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def raw_httpx(url: str, secret: str, count: int, threads: int) -> float:
    """Deliveries/s of a pooled httpx.Client in `threads` threads, each body built and signed
    inside the timed loop, as the relay does per delivery."""
    created = datetime.now(UTC)
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    timeout = httpx.Timeout(10.0, connect=5.0)
    with httpx.Client(limits=limits, timeout=timeout, follow_redirects=False) as client:
        cursor = iter(range(count))
        lock = threading.Lock()

        def post_all() -> None:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                body = event_body(TOPIC, payload(i), created)
                headers = signature_headers([secret], f"raw-{threads}-{i}", int(time.time()), body)
                headers["content-type"] = "application/json"
                response = client.post(url, content=body, headers=headers)
                assert response.status_code == 204, response.status_code

        workers = [threading.Thread(target=post_all) for _ in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return count / (time.perf_counter() - start)


def start_relay(
    url: str, concurrency: int, batch_size: int, max_in_flight: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "WEBHOOKS_MAX_IN_FLIGHT_PER_SUBSCRIPTION": str(max_in_flight),
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": url,
        "WEBHOOKS_ALLOW_LOOPBACK": "true",
        "WEBHOOKS_CONCURRENCY": str(concurrency),
        "WEBHOOKS_BATCH_SIZE": str(batch_size),
        "WEBHOOKS_POLL_INTERVAL": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "webhooks.relay"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def delivered(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        query = select(func.count()).where(WebhookDelivery.status == "delivered")
        return int(session.scalar(query.select_from(WebhookDelivery)) or 0)


def throughput(
    sessions: sessionmaker[Session], receiver: Receiver, events: int
) -> tuple[float, float, float]:
    start = time.perf_counter()
    with sessions.begin() as session:
        for i in range(events):
            publish(session, TOPIC, payload(i))
    committed_wall = time.time()
    committed = time.perf_counter()
    publish_rate = events / (committed - start)
    assert wait_for(lambda: receiver.count() >= events, timeout=600, every=0.05)
    arrivals = receiver.dump()
    last_arrival = max(t for _, t in arrivals)
    to_receiver = events / (last_arrival - committed_wall)
    assert wait_for(lambda: delivered(sessions) >= events, timeout=120, every=0.05)
    to_recorded = events / (time.perf_counter() - committed)
    assert len({i for i, _ in arrivals}) == events
    return publish_rate, to_receiver, to_recorded


def latency(sessions: sessionmaker[Session], receiver: Receiver, samples: int) -> list[float]:
    receiver.dump()
    latencies = []
    for i in range(samples):
        time.sleep(0.02)  # an idle system between events
        with sessions() as session:
            event_id = publish(session, TOPIC, payload(i))
            before_commit = time.time()
            session.commit()
        assert wait_for(lambda: receiver.count() >= 1, timeout=5, every=0.001)
        [(arrived_id, arrived_at)] = receiver.dump()
        assert arrived_id == event_id
        latencies.append(arrived_at - before_commit)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--max-in-flight-per-subscription", type=int, default=2)
    args = parser.parse_args()

    with scratch_database(args.admin_url, "webhooks_bench") as url:
        run(url, args)


def run(url: str, args: argparse.Namespace) -> None:
    engine = make_engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    secret = generate_secret()
    receiver = Receiver(secret)
    relay = None
    try:
        print(
            f"cpus: {os.cpu_count()}, events: {args.events}, concurrency: {args.concurrency}, "
            f"max in flight per subscription: {args.max_in_flight_per_subscription}, {load()}"
        )
        raw_one = raw_httpx(receiver.url, secret, min(args.events, 5000), 1)
        raw = raw_httpx(receiver.url, secret, args.events, args.concurrency)
        receiver.dump()
        print(f"raw httpx, 1 thread:                 {raw_one:8.0f} deliveries/s")
        print(f"raw httpx, {args.concurrency:2d} threads, one Client:  {raw:8.0f} deliveries/s")

        with sessions.begin() as session:
            SqlWebhookSubscriptions(session).add(TOPIC, receiver.url, secret)
        relay = start_relay(
            url, args.concurrency, args.batch_size, args.max_in_flight_per_subscription
        )
        time.sleep(1.5)  # started and LISTENing
        published, to_receiver, to_recorded = throughput(sessions, receiver, args.events)
        print(f"publish (one transaction):           {published:8.0f} events/s")
        print(
            f"relay, commit to last arrival:       {to_receiver:8.0f} deliveries/s "
            f"(ratio {to_receiver / raw_one:.2f} to raw, 1 thread (goal >= 0.8); "
            f"{to_receiver / raw:.2f} to {args.concurrency} threads)"
        )
        print(f"relay, commit to all rows delivered: {to_recorded:8.0f} deliveries/s ({load()})")

        samples = latency(sessions, receiver, args.latency_samples)
        print(
            f"commit-to-delivery latency, idle ({len(samples)} single events): "
            f"p50 {percentile(samples, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(samples, 0.99) * 1000:.1f} ms, "
            f"max {max(samples) * 1000:.1f} ms, mean {statistics.mean(samples) * 1000:.1f} ms"
        )
        print(f"deliveries the subscriber could not verify: {receiver.rejected()}")
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(30)
        receiver.close()
        engine.dispose()


if __name__ == "__main__":
    main()
