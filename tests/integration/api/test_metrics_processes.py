"""`/metrics` under `uvicorn --workers 2` with `PROMETHEUS_MULTIPROC_DIR`: every worker reports
what all of them counted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing.api.keys import create_key
from billing.db import make_session_factory

ROOT = Path(__file__).resolve().parents[3]
EVENTS = 20
_INGEST_ELSEWHERE = """
from billing.metrics import USAGE_INGEST
USAGE_INGEST.labels(outcome="stored").inc(1000)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stored_total(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "billing_usage_ingest_total" and sample.labels == {
                "outcome": "stored"
            }:
                return sample.value
    return 0.0


@pytest.mark.slow
def test_every_uvicorn_worker_reports_the_usage_all_of_them_ingested(sqlite_engine, tmp_path):
    with make_session_factory(sqlite_engine).begin() as session:
        _, key = create_key(session, tenant_id="A", scopes=["billing.write"])
    shared = tmp_path / "prometheus"
    shared.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
    }
    argv = ["billing.app:app", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", *argv, "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, "uvicorn exited"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
        for n in range(EVENTS):
            body = {"metric": "tokens", "amount": 1, "idempotency_key": f"e{n}"}
            response = httpx.post(f"{base}/_billing/usage", json=body, headers=headers, timeout=10)
            assert response.status_code == 202, response.text
        # Another process of the machine (a Dramatiq worker, say) ingests too.
        subprocess.run([sys.executable, "-c", _INGEST_ELSEWHERE], env=env, check=True, timeout=60)
        # Each scrape lands on either web worker; each reports what every process counted.
        assert [stored_total(base) for _ in range(6)] == [float(EVENTS + 1000)] * 6
        text = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'webhooks_outbox_backlog{status="pending"} 0.0' in text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
