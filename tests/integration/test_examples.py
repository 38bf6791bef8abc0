"""The examples run as real processes: uvicorn serving each on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from billing.api.keys import create_key
from billing.db import make_session_factory
from tests.processes import free_port, serving
from webhooks import publish
from webhooks.delivery import Sender, event_body, make_client
from webhooks.models import WebhookDelivery
from webhooks.policy import RetryPolicy
from webhooks.relay import Relay
from webhooks.replay import replay
from webhooks.secrets import generate_secret
from webhooks.settings import parse_schedule
from webhooks.signing import signature_headers
from webhooks.ssrf import AddressPolicy
from webhooks.store import SqlDeliveryStore
from webhooks.subscriptions import SqlWebhookSubscriptions

TOPIC = "billing.invoice.created"

pytestmark = pytest.mark.slow


@contextmanager
def example(module: str, env: dict[str, str], output: Path) -> Iterator[str]:
    """Serve `examples/<module>.py`'s app with uvicorn; yield its base URL once it answers."""
    port = free_port()
    argv = ["--app-dir", "examples", f"{module}:app", "--host", "127.0.0.1", "--port", str(port)]
    argv = [sys.executable, "-m", "uvicorn", *argv, "--log-level", "warning"]
    with serving(argv, env, output, port) as base:
        yield base


def database_env(engine: Engine) -> dict[str, str]:
    return {"DATABASE_URL": engine.url.render_as_string(hide_password=False)}


def test_the_quota_service_answers_429_once_the_plans_daily_reports_are_used(
    sqlite_engine, tmp_path
) -> None:
    with make_session_factory(sqlite_engine).begin() as session:
        _, key = create_key(session, tenant_id="acme", scopes=["billing.read"])
        _, operator_key = create_key(session, operator=True, scopes=["billing.admin"])
    auth = {"Authorization": f"Bearer {key}"}
    operator = {"Authorization": f"Bearer {operator_key}"}
    plan = {
        "key": "starter",
        "name": "Starter",
        "entitlements": [{"key": "reports", "limit_per_window": 3, "window": "day"}],
    }
    service = example("quota_service", database_env(sqlite_engine), tmp_path / "out.log")
    with service as base, httpx.Client(base_url=base, headers=auth, timeout=10) as client:
        unlimited = client.post("/reports")  # no subscription yet: not limited, but counted
        assert (unlimited.status_code, "ratelimit-limit" in unlimited.headers) == (200, False)
        assert client.post("/_billing/plans", json=plan, headers=operator).status_code == 201
        subscribed = client.post(
            "/_billing/subscriptions",
            json={"tenant_id": "acme", "plan_key": "starter"},
            headers=operator,
        )
        assert subscribed.status_code == 201, subscribed.text
        answers = []
        for _ in range(10):
            answers.append(client.post("/reports"))
            if answers[-1].status_code == 429:
                break
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["ratelimit-remaining"] for a in answers[:2]] == ["1", "0"]
    refused = answers[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["limit"] == 3


def deliver_now(factory: sessionmaker) -> int:
    """One pass of a real relay (loopback allowed): claim, post, record."""
    client = make_client(
        policy=AddressPolicy(allow_loopback=True, allow_private_networks=False),
        connect_timeout=5,
        read_timeout=10,
        max_connections=2,
    )
    with client:
        relay = Relay(
            SqlDeliveryStore(factory),
            Sender(client, user_agent="test"),
            RetryPolicy(schedule=parse_schedule("5s")),
        )
        return relay.run_once()


def test_the_webhook_receiver_accepts_a_relayed_delivery_and_rejects_a_tampered_one(
    sqlite_engine, tmp_path
) -> None:
    secret = generate_secret()
    factory = make_session_factory(sqlite_engine)
    output = tmp_path / "received.log"
    with example("webhook_receiver", {"WEBHOOK_SECRET": secret}, output) as base:
        with factory.begin() as session:
            SqlWebhookSubscriptions(session).add(TOPIC, f"{base}/hooks/billing", secret)
            event_id = publish(session, TOPIC, {"tenant_id": "acme", "invoice_id": "inv_1"})
        assert deliver_now(factory) == 1
        with factory() as session:
            delivery = session.scalars(select(WebhookDelivery)).one()
            assert (delivery.status, delivery.last_status_code) == ("delivered", 200)

        # The same event again (a replay): accepted, not processed twice.
        with factory.begin() as session:
            assert replay(session, event_id=event_id) == 1
        assert deliver_now(factory) == 1

        body = event_body(TOPIC, {"tenant_id": "acme", "invoice_id": "inv_2"}, delivery.created_at)
        headers = signature_headers([secret], "evt_signed_here", int(time.time()), body)
        tampered = body.replace(b"inv_2", b"inv_9")
        answer = httpx.post(f"{base}/hooks/billing", content=tampered, headers=headers, timeout=5)
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/problem+json"
        genuine = httpx.post(f"{base}/hooks/billing", content=body, headers=headers, timeout=5)
        assert genuine.status_code == 200
    printed = [json.loads(line) for line in output.read_text().splitlines() if line[:1] == "{"]
    assert printed == [
        {"id": event_id, "type": TOPIC, "data": {"tenant_id": "acme", "invoice_id": "inv_1"}},
        {
            "id": "evt_signed_here",
            "type": TOPIC,
            "data": {"tenant_id": "acme", "invoice_id": "inv_2"},
        },
    ]
