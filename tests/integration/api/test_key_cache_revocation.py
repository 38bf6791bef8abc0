"""`billing keys revoke`, run as its own process, reaches a web process that caches API keys:
the revoked key is refused on that process's next request, however long its cache TTL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from billing.api.keycache import RedisRevocationMarker
from billing.api.keys import create_key
from billing.api.settings import ApiSettings
from billing.app import create_app


def billing_command(*args: str, database_url: str, redis_url: str, namespace: str) -> str:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "BROKER_NAMESPACE": namespace,
    }
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_a_key_revoked_by_the_command_is_refused_on_the_next_request(
    engine, redis_url, redis_namespace
) -> None:
    database_url = engine.url.render_as_string(hide_password=False)
    factory = sessionmaker(engine)
    with factory.begin() as session:
        key, plaintext = create_key(session, tenant_id="A", scopes=["billing.read"])
        key_id = key.id
    settings = ApiSettings(
        redis_url=redis_url,
        broker_namespace=redis_namespace,
        api_key_cache_ttl=timedelta(hours=1),
    )
    app = create_app(settings, session_factory=factory)
    marker = app.state.billing_api.keys.marker
    assert isinstance(marker, RedisRevocationMarker)
    headers = {"Authorization": f"Bearer {plaintext}"}
    with TestClient(app) as client:
        assert client.get("/_billing/usage", headers=headers).status_code == 200
        before = marker.current()
        out = billing_command(
            "keys",
            "revoke",
            key_id,
            database_url=database_url,
            redis_url=redis_url,
            namespace=redis_namespace,
        )
        assert out.strip() == f"key {key_id} revoked"
        assert marker.current() != before
        refused = client.get("/_billing/usage", headers=headers)
    assert refused.status_code == 401


def test_revoke_says_so_when_redis_does_not_answer(sqlite_engine, capsys, monkeypatch) -> None:
    from workers.cli import main

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with sessionmaker(sqlite_engine).begin() as session:
        key_id = create_key(session, tenant_id="A", scopes=["billing.read"])[0].id
    assert main(["keys", "revoke", key_id]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"key {key_id} revoked"
    assert "accept this one for up to API_KEY_CACHE_TTL" in captured.err
