"""billing_metric_check(): the metric limit's lock and check, inside the ledger's insert

Revision ID: 0024_metric_limit_function
Revises: 0023_webhooks_due_per_sub

PostgreSQL only (SQLite keeps `billing.metric_limit.metric_guard`). The ledger's insert calls it
when an event's metric is new to its month (`billing.ledger`): it takes the tenant's metric lock
(held to commit), then reads the months' metrics: a volatile function in READ COMMITTED takes a
fresh snapshot per statement, so the read sees every metric committed before the lock was
granted, as the separate lock and read statements before did. It returns the first of the
months that the new metrics would bring over `p_limit`, as JSON (month, the metrics it has, the
ones added), or NULL when they fit; the insert then stores nothing, or everything.
"""

from __future__ import annotations

from alembic import op

revision = "0024_metric_limit_function"
down_revision = "0023_webhooks_due_per_sub"
branch_labels = None
depends_on = None

_FUNCTION = """
CREATE FUNCTION billing_metric_check(
    p_lock_key text, p_tenant_id text, p_limit integer,
    p_months timestamptz[], p_metrics varchar[]
) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    refusal json;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_lock_key, 0));
    SELECT json_build_object('month', n.month, 'held', n.held, 'added', n.added) INTO refusal
    FROM (
        SELECT p.month, count(*) AS added, (
            SELECT count(*) FROM usage_counters AS c
            WHERE c.tenant_id = p_tenant_id AND c.granularity = 'month'
                AND c.period_start = p.month
        ) AS held
        FROM (
            SELECT DISTINCT u.month, u.metric
            FROM unnest(p_months, p_metrics) AS u(month, metric)
        ) AS p
        WHERE NOT EXISTS (
            SELECT FROM usage_counters AS c
            WHERE c.tenant_id = p_tenant_id AND c.granularity = 'month'
                AND c.period_start = p.month AND c.metric = p.metric
        )
        GROUP BY p.month
    ) AS n
    WHERE n.held + n.added > p_limit
    ORDER BY n.month
    LIMIT 1;
    RETURN refusal;
END
$$
"""


def upgrade() -> None:
    _on_postgresql(_FUNCTION)


def downgrade() -> None:
    _on_postgresql(
        "DROP FUNCTION billing_metric_check(text, text, integer, timestamptz[], varchar[])"
    )


def _on_postgresql(sql: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sql)
