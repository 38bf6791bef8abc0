"""The examples run as real processes: uvicorn serving each on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
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

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "billing.invoice.created"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def example(module: str, env: dict[str, str], output: Path) -> Iterator[str]:
    """Serve `examples/<module>.py`'s app with uvicorn; yield its base URL once it answers."""
    port = free_port()
    argv = ["--app-dir", "examples", f"{module}:app", "--host", "127.0.0.1", "--port", str(port)]
    argv = [sys.executable, "-m", "uvicorn", *argv, "--log-level", "warning"]
    with serve(argv, env, output, port, cwd=ROOT) as base:
        yield base


@contextmanager
def serve(
    argv: list[str], env: dict[str, str], output: Path, port: int, cwd: Path
) -> Iterator[str]:
    """Run `argv` (a web server on `port`); yield its base URL once it answers; SIGTERM it."""
    with output.open("w") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, output.read_text()
            try:
                httpx.get(f"{base}/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


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


def readme_bash_block(containing: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    (block,) = [block for block in blocks if containing in block]
    return block


def json_documents(text: str) -> list[dict]:
    """The JSON objects in `text` (curl prints bodies without a newline), in order."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        document, end = decoder.raw_decode(text, at)
        found.append(document)
        at = text.find("{", end)
    return found


def test_the_readmes_admin_curl_examples_run_twice_against_billing_run(tmp_path) -> None:
    """The README's HTTP admin blocks, run by bash as written (only the port differs) against
    `billing run`: the key once, the calls twice; the second run changes nothing."""
    port = free_port()
    key = readme_bash_block("billing keys create --operator")
    calls = readme_bash_block("$BILLING/plans")
    script = f"{key}\n{calls}\necho ---\n{calls}".replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'billing.sqlite3'}",
        "USAGE_MAX_AGE": "P3650D",  # as the README starts it: its usage is from January 2025
    }
    argv = [f"{bin_dir}/billing", "run", "--web-port", str(port), "--no-relay"]
    with serve(argv, env, tmp_path / "run.log", port, cwd=tmp_path):
        done = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    first, second = (json_documents(run) for run in done.stdout.split("---\n"))
    plan, fee, tokens, calls_price, subscription, usage, totals, invoices, operators = first
    assert (plan["key"], plan["entitlements"][0]["limit_per_window"]) == ("pro", 100)
    prices = [fee, tokens, calls_price]
    assert [price["key"] for price in prices] == ["pro-fee", "pro-tokens", "pro-calls"]
    assert (subscription["tenant_id"], subscription["plan_key"]) == ("acme", "pro")
    assert usage["duplicate"] is False
    assert [item["total"] for item in totals["items"]] == [12_345_678]
    ((invoice,),) = [invoices["items"]]
    assert (invoice["total_amount"], invoice["currency"]) == (2100 + 2469, "usd")
    assert operators["items"] == [invoice]
    assert second[0]["prices"] == sorted(prices, key=lambda price: price["key"])
    assert second[1:5] == [*prices, subscription]  # updated in place; the subscription replayed
    assert (second[5]["duplicate"], second[6:]) == (True, [totals, invoices, operators])
