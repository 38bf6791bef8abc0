"""The baseline of bench_api.py: a bare FastAPI endpoint doing the ledger's insert, nothing else.

No auth, no idempotency middleware, no duplicate check: one pydantic body, the same
`INSERT … ON CONFLICT DO NOTHING RETURNING id` on the same engine set-up, one commit.
Run as `uvicorn bare_usage_app:app --app-dir bench` with DATABASE_URL set.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text

from billing.db import make_engine, make_session_factory

INSERT = text(
    "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, idempotency_key, "
    "metadata_json, created_at) VALUES (:id, :tenant, :metric, :amount, :at, :key, NULL, :at) "
    "ON CONFLICT (tenant_id, metric, idempotency_key) DO NOTHING RETURNING id"
)

sessions = make_session_factory(make_engine(os.environ["DATABASE_URL"]))
app = FastAPI()


class Usage(BaseModel):
    metric: str
    amount: int
    idempotency_key: str


@app.post("/usage", status_code=202)
def record(body: Usage) -> dict[str, str | None]:
    now = datetime.now(UTC)
    with sessions.begin() as session:
        event_id = session.execute(
            INSERT,
            {
                "id": str(uuid.uuid4()),
                "tenant": "bare",
                "metric": body.metric,
                "amount": body.amount,
                "at": now,
                "key": body.idempotency_key,
            },
        ).scalar()
    return {"id": event_id}
