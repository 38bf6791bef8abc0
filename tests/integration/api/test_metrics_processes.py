"""`/metrics` under `uvicorn --workers 2` with `PROMETHEUS_MULTIPROC_DIR`: every worker reports
what all of them counted."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing.api.keys import create_key
from billing.db import make_session_factory
from tests.processes import free_port, serving

EVENTS = 20
_INGEST_ELSEWHERE = """
from billing.metrics import USAGE_INGEST
USAGE_INGEST.labels(outcome="stored").inc(1000)
"""


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
        "DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
    }
    argv = ["billing.app:app", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    argv = [sys.executable, "-m", "uvicorn", *argv, "--log-level", "warning"]
    with serving(argv, env, tmp_path / "uvicorn.log", port, ready="/healthz") as base:
        headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
        for n in range(EVENTS):
            body = {"metric": "tokens", "amount": 1, "idempotency_key": f"e{n}"}
            response = httpx.post(f"{base}/_billing/usage", json=body, headers=headers, timeout=10)
            assert response.status_code == 202, response.text
        # Another process of the machine (a Dramatiq worker, say) ingests too.
        run_env = {**os.environ, **env}
        subprocess.run(
            [sys.executable, "-c", _INGEST_ELSEWHERE], env=run_env, check=True, timeout=60
        )
        # Each scrape lands on either web worker; each reports what every process counted.
        assert [stored_total(base) for _ in range(6)] == [float(EVENTS + 1000)] * 6
        text = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'webhooks_outbox_backlog{status="pending"} 0.0' in text
