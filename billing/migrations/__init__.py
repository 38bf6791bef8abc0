"""The project's Alembic migrations (billing and webhooks tables in one history)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import MetaData

_PARTITION = re.compile(r"usage_events_(p\d{4}_\d{2}|default)")


def env_metadata() -> list[MetaData]:
    """Every MetaData the migrations must match (the autogenerate target)."""
    from billing.api.models import ApiBase
    from billing.models import POSTGRESQL_METADATA
    from billing.models import Base as BillingBase
    from webhooks.models import Base as WebhooksBase

    return [BillingBase.metadata, WebhooksBase.metadata, ApiBase.metadata, POSTGRESQL_METADATA]


def include_object(dialect: str) -> Callable[..., bool]:
    """Autogenerate's filter on `dialect`: the models' objects of another dialect only
    (`info["dialects"]`, see `billing.models.only_on`) and the partitions of `usage_events`
    (made by `billing.partitions`, not by the models) are left out of the comparison."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, _other: Any) -> bool:
        if reflected:
            return not (type_ == "table" and name is not None and _PARTITION.fullmatch(name))
        dialects = getattr(obj, "info", {}).get("dialects")
        return dialects is None or dialect in dialects

    return include
