"""billing.app (the web process) and the `billing keys` commands."""

from __future__ import annotations

import os
import subprocess
import sys

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from billing.api.idempotency import MemoryIdempotencyStore
from billing.api.models import ApiKey
from billing.api.settings import ApiSettings
from billing.app import create_app
from webhooks import publish
from webhooks.subscriptions import SqlWebhookSubscriptions
from workers.cli import main


def test_healthz_answers_200_when_the_database_does(session_factory) -> None:
    app = create_app(ApiSettings(), session_factory=session_factory)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_healthz_answers_503_when_the_database_does_not(tmp_path) -> None:
    settings = ApiSettings(database_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite3")
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"


def test_the_app_mounts_billing_with_idempotency(session_factory, make_key) -> None:
    store = MemoryIdempotencyStore()
    app = create_app(ApiSettings(), session_factory=session_factory, idempotency_store=store)
    headers = {**make_key("A"), "Idempotency-Key": "x"}
    body = {"metric": "m", "amount": 1, "idempotency_key": "e"}
    with TestClient(app) as client:
        assert client.post("/_billing/usage", json=body, headers=headers).status_code == 202
        again = client.post("/_billing/usage", json=body, headers=headers)
    assert again.headers["idempotent-replayed"] == "true"
    assert len(store.data) == 1


def scraped(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample of the app's `/metrics`."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_count_the_usage_the_api_ingests(session_factory, make_key) -> None:
    app = create_app(ApiSettings(), session_factory=session_factory)
    headers = make_key("A")
    body = {"metric": "m", "amount": 1, "idempotency_key": "e1"}
    with TestClient(app) as client:
        stored = scraped(client, "billing_usage_ingest_total", outcome="stored")
        duplicates = scraped(client, "billing_usage_ingest_total", outcome="duplicate")
        assert client.post("/_billing/usage", json=body, headers=headers).status_code == 202
        assert client.post("/_billing/usage", json=body, headers=headers).status_code == 200
        assert scraped(client, "billing_usage_ingest_total", outcome="stored") == stored + 1
        assert scraped(client, "billing_usage_ingest_total", outcome="duplicate") == duplicates + 1


def test_metrics_show_the_webhook_outbox_read_from_the_database(session_factory) -> None:
    app = create_app(ApiSettings(), session_factory=session_factory)
    with TestClient(app) as client:
        assert scraped(client, "webhooks_outbox_backlog", status="pending") == 0
        with session_factory.begin() as session:
            SqlWebhookSubscriptions(session).add("billing.invoice.created", "https://a.test/h")
            publish(session, "billing.invoice.created", {"tenant_id": "A"})
        assert scraped(client, "webhooks_outbox_backlog", status="pending") == 1
        assert scraped(client, "webhooks_outbox_due") == 1
        assert scraped(client, "webhooks_deliveries_dead") == 0
        assert scraped(client, "webhooks_deliveries_total", outcome="delivered") >= 0
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_settings_read_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("IDEMPOTENCY_TTL", "3600")
    monkeypatch.setenv("BILLING_PREFIX", "/billing")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")
    settings = ApiSettings()
    assert settings.idempotency_ttl.total_seconds() == 3600
    assert (settings.billing_prefix, settings.redis_url) == ("/billing", "redis://127.0.0.1:6379/3")
    assert ApiSettings(_env_file=None).idempotency_lock_ttl.total_seconds() == 300


def test_keys_create_prints_a_key_once_and_revoke_disables_it(
    sqlite_engine, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    code = main(
        [
            "keys",
            "create",
            "--tenant",
            "T1",
            "--scope",
            "billing.read",
            "--scope",
            "billing.write",
            "--name",
            "ci",
        ]
    )
    plaintext = capsys.readouterr().out.strip()
    assert code == 0
    assert plaintext.startswith("bk_")
    with sqlite_engine.connect() as conn:
        key_id, tenant, scopes, key_hash = conn.execute(
            select(ApiKey.id, ApiKey.tenant_id, ApiKey.scopes, ApiKey.key_hash)
        ).one()
    assert (tenant, scopes) == ("T1", ["billing.read", "billing.write"])
    assert plaintext not in key_hash
    assert main(["keys", "list", "--tenant", "T1"]) == 0
    assert "active" in capsys.readouterr().out
    assert main(["keys", "revoke", key_id]) == 0
    assert main(["keys", "revoke", "no-such-key"]) == 1
    main(["keys", "list"])
    assert "revoked" in capsys.readouterr().out


def test_metrics_token_keeps_metrics_from_callers_without_it(session_factory) -> None:
    settings = ApiSettings(metrics_token="s3cret-scrape-token")
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        for authorization in (None, "Bearer wrong", "Basic s3cret-scrape-token", "Bearer "):
            headers = {"Authorization": authorization} if authorization else {}
            refused = client.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
            assert "billing_" not in refused.text
        allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape-token"})
    assert allowed.status_code == 200
    assert "billing_usage_ingest_total" in allowed.text


def test_metrics_are_open_without_a_token(session_factory) -> None:
    with TestClient(create_app(ApiSettings(), session_factory=session_factory)) as client:
        assert client.get("/metrics").status_code == 200


def test_the_served_app_logs_at_log_level_with_untrusted_text_escaped(tmp_path) -> None:
    """`uvicorn billing.app:app` imports `app`: its process logs INFO lines (they were dropped)
    and escapes what a request put in them (Python's last-resort handler wrote them raw)."""
    logs = (
        "import logging, billing.app; log = logging.getLogger('billing.api.problems'); "
        "log.warning('unhandled error on GET %s', '/x/\\x1b[2J'); log.info('refused')"
    )
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/web.db", "LOG_LEVEL": "INFO"}
    ran = subprocess.run(
        [sys.executable, "-c", logs], env=env, capture_output=True, timeout=60, check=True
    )
    lines = ran.stderr.decode().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "WARNING billing.api.problems unhandled error on GET /x/\\x1b[2J",
        "INFO billing.api.problems refused",
    ]
