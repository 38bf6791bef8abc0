"""The raw baselines' insert, shaped as the ledger's on PostgreSQL: `usage_events` is partitioned
by month (migration 0018), so a statement claims each event's key in `usage_event_keys` and
stores the events whose keys it claimed (`billing.ledger._CLAIM_AND_STORE`, written out here)."""

from __future__ import annotations


def claim_and_store(source: str) -> str:
    """One statement storing the rows `source` selects (id, tenant_id, metric, amount, at_ts,
    idempotency_key, metadata_json) whose keys are new; RETURNING id, metric, idempotency_key."""
    return f"""
WITH source AS ({source}),
claimed AS (
    INSERT INTO usage_event_keys (tenant_id, metric, idempotency_key, at_ts, amount, event_id)
    SELECT tenant_id, metric, idempotency_key, at_ts, amount, id FROM source
    ON CONFLICT (tenant_id, metric, idempotency_key) DO NOTHING
    RETURNING event_id
)
INSERT INTO usage_events
    (id, tenant_id, metric, amount, at_ts, idempotency_key, metadata_json, created_at)
SELECT s.id, s.tenant_id, s.metric, s.amount, s.at_ts, s.idempotency_key, s.metadata_json, now()
FROM source AS s JOIN claimed AS c ON c.event_id = s.id
RETURNING id, metric, idempotency_key
"""
