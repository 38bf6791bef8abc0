"""The project's Alembic migrations (billing and webhooks tables in one history)."""

from __future__ import annotations

from sqlalchemy import MetaData


def env_metadata() -> list[MetaData]:
    """Every MetaData the migrations must match (the autogenerate target)."""
    from billing.api.models import ApiBase
    from billing.models import Base as BillingBase
    from webhooks.models import Base as WebhooksBase

    return [BillingBase.metadata, WebhooksBase.metadata, ApiBase.metadata]
