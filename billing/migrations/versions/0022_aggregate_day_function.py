"""billing_aggregate_day(): a day's aggregation locks, zone and meter (and a `latest` upsert) in
one statement

Revision ID: 0022_aggregate_day_function
Revises: 0021_webhooks_delivery_slots

PostgreSQL only (SQLite keeps its path). The function takes the tenant's zone lock (shared) and
the (tenant, metric) aggregation lock, then reads the tenant's stored zone and the metric's
meter: each of its statements takes a fresh snapshot (a volatile function in READ COMMITTED),
so they see everything committed before the locks were granted, as the separate statements
before did (`billing.aggregation`). Asked to (`p_upsert`), when the zone is the one the caller
cut the day in and the meter is `latest` without groups, it also runs the day's upsert and
returns its total; else the total is NULL and the caller sends its upsert
(`billing.aggregation._upsert_statement`, whose `latest` quantity this one mirrors) with the
locks held. Only `latest`: its upsert takes a fraction of a millisecond, so a round trip is a
large part of it; the other aggregations scan the day.
"""

from __future__ import annotations

from alembic import op

revision = "0022_aggregate_day_function"
down_revision = "0021_webhooks_delivery_slots"
branch_labels = None
depends_on = None

_FUNCTION = """
CREATE FUNCTION billing_aggregate_day(
    p_zone_key text, p_pair_key text, p_tenant_id text, p_metric text,
    p_upsert boolean, p_zone text, p_start timestamptz, p_end timestamptz,
    p_id text, p_now timestamptz,
    OUT day_total bigint, OUT stored_zone text, OUT meter_aggregation text,
    OUT meter_property text, OUT meter_group_by json
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtextextended(p_zone_key, 0)),
        pg_advisory_xact_lock(hashtextextended(p_pair_key, 0));
    SELECT tenants.timezone INTO stored_zone FROM tenants WHERE tenants.id = p_tenant_id;
    SELECT meters.aggregation, meters.property, meters.group_by
        INTO meter_aggregation, meter_property, meter_group_by
        FROM meters WHERE meters.key = p_metric;
    IF NOT p_upsert OR stored_zone IS DISTINCT FROM p_zone
            OR meter_aggregation IS DISTINCT FROM 'latest'
            OR json_array_length(meter_group_by) <> 0 THEN
        RETURN;
    END IF;
    WITH dropped_groups AS (
        DELETE FROM usage_aggregates
        WHERE usage_aggregates.tenant_id = p_tenant_id AND usage_aggregates.metric = p_metric
            AND usage_aggregates.period_start = p_start
            AND usage_aggregates.granularity = 'day' AND usage_aggregates.group_key <> ''
    )
    INSERT INTO usage_aggregates (
        id, tenant_id, metric, period_start, granularity, total, updated_at, group_key
    )
    SELECT p_id, p_tenant_id, p_metric, p_start, 'day', coalesce((
        SELECT usage_events.amount FROM usage_events
        WHERE usage_events.tenant_id = p_tenant_id AND usage_events.metric = p_metric
            AND usage_events.at_ts >= p_start AND usage_events.at_ts < p_end
        ORDER BY usage_events.at_ts DESC, usage_events.amount DESC
        LIMIT 1
    ), 0), p_now, ''
    ON CONFLICT (tenant_id, metric, period_start, granularity, group_key) DO UPDATE
    SET total = excluded.total,
        updated_at = CASE WHEN usage_aggregates.total <> excluded.total
            THEN excluded.updated_at ELSE usage_aggregates.updated_at END
    RETURNING usage_aggregates.total INTO day_total;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "DROP FUNCTION billing_aggregate_day(text, text, text, text, boolean, text, timestamptz, "
        "timestamptz, text, timestamptz)"
    )
