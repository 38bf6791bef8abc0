"""operator keys: an API key may have no tenant; tenant keys lose billing.admin

Revision ID: 0007_operator_keys
Revises: 0006_status_indexes

`api_keys.tenant_id` becomes nullable: a key without a tenant is an operator's. `billing.admin`
is taken from every tenant-bound key (it let one tenant change the catalogue every tenant is
billed from, and end its own subscription to lift its quotas); a key left with no scope is
revoked. Operators then create their own key: `billing keys create --operator --scope
billing.admin`. Each changed key is logged. The downgrade deletes operator keys.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import UTCDateTime

revision = "0007_operator_keys"
down_revision = "0006_status_indexes"
branch_labels = None
depends_on = None

logger = logging.getLogger("alembic.runtime.migration")

_keys = sa.table(
    "api_keys",
    sa.column("id", sa.String),
    sa.column("tenant_id", sa.String),
    sa.column("scopes", sa.JSON),
    sa.column("revoked_at", UTCDateTime()),
)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("tenant_id", existing_type=sa.String(length=64), nullable=True)
    bind = op.get_bind()
    now = datetime.now(tz=UTC)
    for key_id, tenant_id, scopes, revoked_at in bind.execute(
        sa.select(_keys.c.id, _keys.c.tenant_id, _keys.c.scopes, _keys.c.revoked_at)
    ).all():
        scopes = json.loads(scopes) if isinstance(scopes, str) else list(scopes)
        if "billing.admin" not in scopes:
            continue
        kept = [scope for scope in scopes if scope != "billing.admin"]
        values: dict[str, object] = {"scopes": kept}
        if not kept and revoked_at is None:
            values["revoked_at"] = now
        bind.execute(sa.update(_keys).where(_keys.c.id == key_id).values(**values))
        logger.warning(
            "api key %s of tenant %r lost billing.admin%s; create an operator key with "
            "`billing keys create --operator --scope billing.admin`",
            key_id,
            tenant_id,
            " and, holding no other scope, was revoked" if not kept else "",
        )


def downgrade() -> None:
    op.execute(sa.delete(_keys).where(_keys.c.tenant_id.is_(None)))
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("tenant_id", existing_type=sa.String(length=64), nullable=False)
