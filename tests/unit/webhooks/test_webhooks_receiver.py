"""The FastAPI receiver dependency: verifies, drops repeated ids, forgets ids on failure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from webhooks.delivery import event_body
from webhooks.receiver import (
    MemoryDedupeStore,
    ReceivedWebhook,
    RedisDedupeStore,
    add_problem_handler,
    webhook_receiver,
)
from webhooks.signing import signature_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = event_body("billing.invoice.created", {"tenant_id": "t1"}, datetime(2025, 1, 1, tzinfo=UTC))


def signed(event_id: str = "evt_1", secret: str = SECRET, body: bytes = BODY) -> dict[str, str]:
    now = int(datetime.now(UTC).timestamp())
    return signature_headers([secret], event_id, now, body) | {"content-type": "application/json"}


def make_app(dedupe, secrets=SECRET, fail_times: int = 0):
    app = FastAPI()
    add_problem_handler(app)
    received: list[ReceivedWebhook] = []
    failures = {"left": fail_times}

    receive = webhook_receiver(secrets, dedupe=dedupe)

    @app.post("/hook")
    # A default, not Annotated: string annotations cannot name this local dependency.
    def hook(event: ReceivedWebhook = Depends(receive)) -> dict:  # noqa: B008
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("handler crashed")
        received.append(event)
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False), received


def test_a_valid_delivery_reaches_the_endpoint_parsed() -> None:
    client, received = make_app(MemoryDedupeStore())
    response = client.post("/hook", content=BODY, headers=signed())
    assert response.status_code == 200
    [event] = received
    assert (event.id, event.type, event.data) == (
        "evt_1",
        "billing.invoice.created",
        {"tenant_id": "t1"},
    )
    assert event.timestamp == "2025-01-01T00:00:00+00:00"


def test_a_bad_signature_is_rejected_as_problem_json() -> None:
    client, received = make_app(MemoryDedupeStore())
    response = client.post("/hook", content=BODY, headers=signed(secret="whsec_b3RoZXI="))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Invalid webhook"
    assert "signature" in response.json()["detail"]
    assert received == []


def test_a_tampered_body_is_rejected() -> None:
    client, received = make_app(MemoryDedupeStore())
    response = client.post("/hook", content=BODY.replace(b"t1", b"t9"), headers=signed())
    assert response.status_code == 400
    assert received == []


def test_a_repeated_id_is_answered_200_and_not_processed() -> None:
    client, received = make_app(MemoryDedupeStore())
    assert client.post("/hook", content=BODY, headers=signed()).status_code == 200
    repeat = client.post("/hook", content=BODY, headers=signed())
    assert repeat.status_code == 200
    assert repeat.json()["title"] == "Duplicate webhook"
    assert len(received) == 1


def test_without_a_dedupe_store_repeats_are_processed() -> None:
    client, received = make_app(None)
    client.post("/hook", content=BODY, headers=signed())
    client.post("/hook", content=BODY, headers=signed())
    assert len(received) == 2


def test_an_id_is_forgotten_when_the_endpoint_fails_so_the_retry_is_processed() -> None:
    client, received = make_app(MemoryDedupeStore(), fail_times=1)
    assert client.post("/hook", content=BODY, headers=signed()).status_code == 500
    assert client.post("/hook", content=BODY, headers=signed()).status_code == 200
    assert len(received) == 1


def test_secrets_may_be_read_on_each_request() -> None:
    current = ["whsec_b3RoZXI="]
    client, received = make_app(MemoryDedupeStore(), secrets=lambda: current)
    assert client.post("/hook", content=BODY, headers=signed()).status_code == 400
    current.append(SECRET)
    assert client.post("/hook", content=BODY, headers=signed()).status_code == 200


def test_memory_store_forgets_after_its_ttl() -> None:
    now = [0.0]
    store = MemoryDedupeStore(timedelta(seconds=10), clock=lambda: now[0])
    assert store.first_time("a")
    assert not store.first_time("a")
    now[0] = 10.5
    assert store.first_time("a")


def test_redis_store_uses_set_nx_with_a_ttl() -> None:
    client = fakeredis.FakeRedis()
    store = RedisDedupeStore(client, prefix="p:", ttl=timedelta(hours=1))
    assert store.first_time("a")
    assert not store.first_time("a")
    assert 3590 < client.ttl("p:a") <= 3600
    store.forget("a")
    assert store.first_time("a")


@pytest.mark.redis
def test_redis_store_drops_repeats_across_receivers_on_a_real_server(
    redis_url: str, redis_namespace: str
) -> None:
    import redis

    prefix = f"{redis_namespace}:"
    with redis.Redis.from_url(redis_url) as server:
        first, _ = make_app(RedisDedupeStore(server, prefix=prefix))
        second, received = make_app(RedisDedupeStore(server, prefix=prefix))
        assert first.post("/hook", content=BODY, headers=signed()).status_code == 200
        repeat = second.post("/hook", content=BODY, headers=signed())
        assert repeat.json()["title"] == "Duplicate webhook"
        assert received == []
        server.delete(prefix + "evt_1")
