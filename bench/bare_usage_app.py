"""The baseline of bench_api.py: a bare FastAPI endpoint doing the ledger's insert, nothing else.

No auth, no idempotency middleware, no duplicate check: one pydantic body, the same
insert (`raw_sql.claim_and_store`: the key claimed, the event stored) on the same engine
set-up, one commit.
Run as `uvicorn bare_usage_app:app --app-dir bench` with DATABASE_URL set.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

from fastapi import FastAPI
from pydantic import BaseModel
from raw_sql import claim_and_store
from sqlalchemy import text

from billing.db import make_engine, make_session_factory

INSERT = text(
    claim_and_store(
        "SELECT CAST(:id AS varchar) AS id, CAST(:tenant AS varchar) AS tenant_id, "
        "CAST(:metric AS varchar) AS metric, CAST(:amount AS bigint) AS amount, "
        "CAST(:at AS timestamptz) AS at_ts, CAST(:key AS varchar) AS idempotency_key, "
        "CAST(NULL AS json) AS metadata_json"
    )
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
