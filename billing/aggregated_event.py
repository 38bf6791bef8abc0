"""The `billing.usage_aggregated` event: `{tenant_id, metric, day_start, total}`, its stable id,
and both as SQL over a day's total, so that on PostgreSQL the statement that upserts the total
also stores the event (`billing.aggregation`).

The id is a digest of what the event says, so a re-run with the same total publishes the same
id (stored once) and a new total a new event. The SQL forms give exactly what `publish` would
store: the same id, the same JSON text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Select, String, Text, bindparam, cast, func, literal, select
from sqlalchemy.dialects import postgresql

from webhooks.sqltypes import UTCDateTime

USAGE_AGGREGATED = "billing.usage_aggregated"
_ID_PREFIX = "usage_aggregated_"


def aggregated_payload(tenant_id: str, metric: str, day_start: str, total: int) -> dict[str, Any]:
    """The event's payload; `day_start` is the local midnight in ISO 8601 with its offset."""
    return {"tenant_id": tenant_id, "metric": metric, "day_start": day_start, "total": total}


def aggregate_event_id(event: Mapping[str, Any]) -> str:
    """The stable id of a `billing.usage_aggregated` event: a digest of what it says."""
    key = [event["tenant_id"], event["metric"], event["day_start"], event["total"]]
    digest = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()
    return f"{_ID_PREFIX}{digest[:40]}"


def event_params(tenant_id: str, metric: str, day_start: str) -> dict[str, str]:
    """The bound values `event_row` reads: the JSON texts of the id's digest and of the payload
    up to the total (a JSON number is the integer's decimal text, as in SQL)."""
    known = aggregated_payload(tenant_id, metric, day_start, 0)
    del known["total"]
    key = json.dumps([tenant_id, metric, day_start], separators=(",", ":"))
    return {
        "event_id_head": key[:-1] + ",",
        "event_payload_head": json.dumps(known)[:-1] + ', "total": ',
        "event_tenant_id": tenant_id,
    }


def event_row(total: ColumnElement[int]) -> Select[Any]:
    """PostgreSQL: a SELECT of the event's `webhook_events` row (id, topic, tenant_id, payload,
    created_at) for the day total `total`, bound by `event_params` and `now`."""
    text_total = cast(total, Text)
    key = bindparam("event_id_head", type_=String()) + text_total + literal("]")
    digest = func.encode(func.sha256(func.convert_to(key, literal("UTF8"))), literal("hex"))
    payload = bindparam("event_payload_head", type_=String()) + text_total + literal("}")
    return select(
        literal(_ID_PREFIX) + func.substr(digest, 1, 40),
        literal(USAGE_AGGREGATED),
        bindparam("event_tenant_id", type_=String()),
        cast(payload, postgresql.JSON),
        bindparam("now", type_=UTCDateTime()),
    )
