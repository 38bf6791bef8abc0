"""Redis down under a real server: an idempotent POST gets 503 with Retry-After, and the
connection stays open for the next request (it used to get a bare 500 and a dropped socket)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from redis.asyncio import Redis
from sqlalchemy.orm import sessionmaker

from billing.api.idempotency import RedisIdempotencyStore
from billing.api.keys import create_key
from billing.api.settings import ApiSettings
from billing.app import create_app
from tests.processes import serve_app


def test_redis_down_answers_503_and_keeps_the_connection(sqlite_engine) -> None:
    factory = sessionmaker(sqlite_engine)
    with factory.begin() as session:
        _, plaintext = create_key(session, tenant_id="A", scopes=["billing.write"])
    dead = RedisIdempotencyStore(Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))
    app = create_app(ApiSettings(), session_factory=factory, idempotency_store=dead)
    body = json.dumps({"metric": "tokens", "amount": 1, "idempotency_key": "e1"})
    headers = {
        "Authorization": f"Bearer {plaintext}",
        "Content-Type": "application/json",
        "Idempotency-Key": "k1",
    }
    with serve_app(app) as base:
        url = urlsplit(base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        try:
            conn.request("POST", "/_billing/usage", body=body, headers=headers)
            refused = conn.getresponse()
            refused_body = json.loads(refused.read())
            socket = conn.sock
            conn.request("GET", "/healthz")
            health = conn.getresponse()
            health.read()
            assert conn.sock is socket  # the same connection served the second request
        finally:
            conn.close()
    assert refused.status == 503
    assert refused.getheader("Retry-After") == "5"
    assert refused.getheader("Connection") != "close"
    assert refused_body["type"] == "urn:billing:problem:idempotency-unavailable"
    assert health.status == 200
