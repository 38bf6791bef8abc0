"""A hard quota holds under concurrency: limit 100, 50 clients, 300 requests, 100 succeed."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import func, select

from billing.api import add_billing, register_error_handlers, require_quota
from billing.api.keys import create_key
from billing.api.models import UsageCounter
from billing.db import make_session_factory
from billing.models import Plan, PlanEntitlement, Subscription, UsageEvent
from tests.processes import serve_app

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CLIENTS = 50
REQUESTS = 300
LIMIT = 100


@pytest.mark.parametrize("window", ["day", "month"])
def test_exactly_the_limit_of_concurrent_requests_succeeds(pg_engine, window, race) -> None:
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(
            PlanEntitlement(plan_id=plan.id, key="calls", window=window, limit_per_window=LIMIT)
        )
        session.add(
            Subscription(
                tenant_id="A",
                plan_id=plan.id,
                effective_at=datetime.now(UTC) - timedelta(days=1),
            )
        )
        _, plaintext = create_key(session, tenant_id="A", scopes=["billing.read"])

    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=factory)

    @app.post("/call", dependencies=[Depends(require_quota("calls", window=window, consume=1))])
    def call() -> dict:
        return {"ok": True}

    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {plaintext}"}

    def client(base_url: str) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
            for _ in range(REQUESTS // CLIENTS):
                status = http.post("/call").status_code
                with lock:
                    statuses[status] += 1

    with serve_app(app) as base_url:
        assert race(CLIENTS, lambda _: client(base_url)) == [None] * CLIENTS

    assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}
    with factory() as session:
        used = session.execute(select(func.sum(UsageEvent.amount))).scalar_one()
        counted = session.execute(
            select(UsageCounter.total).where(UsageCounter.granularity == window)
        ).scalar_one()
    assert used == counted == LIMIT
