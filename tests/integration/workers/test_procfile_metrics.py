"""The README's Procfile recipe, as written, on PostgreSQL and Redis: `/metrics` on the web
process counts what the worker and the relay did (they share `PROMETHEUS_MULTIPROC_DIR`)."""

from __future__ import annotations

import http.server
import re
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from billing.models import Invoice
from webhooks.subscriptions import SqlWebhookSubscriptions
from workers.jobs import INVOICE_CREATED, USAGE_AGGREGATED

from .conftest import free_port, procfile_command, wait_until
from .test_processes import count, covered_day, invoiced_month, seed_subscriptions, seed_usage

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


class _Accept(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    server.shutdown()
    server.server_close()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, flags=re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_the_procfiles_metrics_count_the_workers_and_the_relays_work(
    spawn, base_env, pg_factory, receiver, tmp_path
) -> None:
    day = covered_day()
    start, _end = invoiced_month()
    seed_usage(pg_factory, 3, day)
    seed_subscriptions(pg_factory, ["t00000", "t00001"], start)
    with pg_factory.begin() as session:
        subscriptions = SqlWebhookSubscriptions(session)
        for topic in (USAGE_AGGREGATED, INVOICE_CREATED):
            subscriptions.add(topic, receiver, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    port = free_port()
    assert not (tmp_path / "metrics").exists()  # base_env's folder: the processes create it
    env = {
        **base_env,
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "WEBHOOKS_ALLOW_LOOPBACK": "true",
        "WEBHOOKS_POLL_INTERVAL": "0.2",
    }
    processes = [spawn(name, procfile_command(name), env) for name in ("web", "worker", "relay")]
    processes.append(spawn("scheduler", procfile_command("scheduler"), env))  # the catch-up
    base = f"http://127.0.0.1:{port}"

    def scraped() -> str:
        try:
            return httpx.get(f"{base}/metrics", timeout=5).text
        except httpx.TransportError:
            return ""

    wait_until(
        lambda: metric(scraped(), 'webhooks_deliveries_total{outcome="delivered"}') == 5,
        timeout=90,
        what="5 deliveries counted on the web process's /metrics",
    )
    text = scraped()
    assert metric(text, "billing_invoice_generated_total") == 2
    assert metric(text, "billing_aggregate_duration_ms_count") == 3
    assert count(pg_factory, Invoice, Invoice.period_start == start) == 2
    for process in processes:
        process.signal(signal.SIGTERM)
    for process in processes:
        assert process.wait(timeout=30) in (0, -signal.SIGTERM), process.output()


def test_every_procfile_line_shares_one_metrics_folder_by_default() -> None:
    for name in ("web", "worker", "scheduler", "relay"):
        assert procfile_command(name).startswith(
            "env PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-/tmp/billing-metrics} "
        )
