"""Recording usage events: validated, and stored once per (tenant, metric, idempotency key).

Storing is one `INSERT … ON CONFLICT DO NOTHING` (SQLite and PostgreSQL both have it; batches on
PostgreSQL are COPYed into a staging table first, see `_copy_to_stage`), so
concurrent senders of the same event never see an `IntegrityError` and the caller's transaction
is never rolled back: the losers read the winner's row and compare it with what they sent.

On PostgreSQL `usage_events` is partitioned by month (`billing.partitions`), so the key that
conflicts is `usage_event_keys`' (tenant, metric, idempotency key): one statement claims the
keys there and stores the events whose keys it claimed, and duplicates are matched there.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

import psycopg
from sqlalchemy import Table, and_, or_, select, tuple_
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from billing import driver_sql
from billing.errors import IdempotencyConflictError, InvalidUsageError, TooManyMetricsError
from billing.localtime import zone
from billing.models import UsageEvent, usage_event_keys
from webhooks.sqltypes import new_id, utcnow

MAX_METRIC_LENGTH = 100
#: Metric names: ASCII letters, digits and `_ . - : /` (nothing that prints as something else).
METRIC_CHARSET = "ASCII letters, digits and _ . - : /"
METRIC_PATTERN = r"^[A-Za-z0-9_.:/-]+$"
_METRIC = re.compile(r"[A-Za-z0-9_.:/-]+")
MAX_KEY_LENGTH = 255
MAX_TENANT_LENGTH = 64
MAX_METADATA_BYTES = 16 * 1024
MAX_AMOUNT = 2**63 - 1
#: How far ahead of the clock an event may be (clock skew between hosts), never more.
MAX_FUTURE = timedelta(minutes=5)
# Rows per INSERT (and per lookup of stored duplicates): PostgreSQL takes at most 65,535 bound
# parameters per statement.
INSERT_CHUNK = 1000


class UsageInput(NamedTuple):
    """One validated usage event, ready to store (a named tuple: made per event of a batch, at
    half the CPU of a frozen dataclass)."""

    metric: str
    amount: int
    at: datetime
    idempotency_key: str
    #: The metadata as compact JSON text, encoded once when validated (what PostgreSQL stores).
    metadata_json: str | None = None


def validate_tenant(tenant_id: object) -> str:
    """Return `tenant_id` if it is a non-empty string of at most 64 characters."""
    return _bounded_text(tenant_id, "tenant_id", MAX_TENANT_LENGTH)


def validate_usage(
    *,
    metric: object,
    amount: object,
    at: object,
    idempotency_key: object,
    metadata: object = None,
    now: datetime | None = None,
    max_age: timedelta | None = None,
) -> UsageInput:
    """Check one event's fields; raises `InvalidUsageError` naming the first bad field.

    With `now`, `at` may be at most `MAX_FUTURE` (5 minutes) after it and, with `max_age`
    too, at most that long before it. Without `max_age` old events are taken (backfills).
    """
    return UsageInput(
        metric=validate_metric(metric),
        amount=_amount(amount),
        at=_in_window(_aware_utc(at), now, max_age),
        idempotency_key=_bounded_text(idempotency_key, "idempotency_key", MAX_KEY_LENGTH),
        metadata_json=_metadata(metadata),
    )


def validate_metric(metric: object) -> str:
    """Return `metric` if it is 1 to 100 characters of `METRIC_CHARSET`.

    Raises:
        InvalidUsageError: with `.field` "metric"; the message does not echo the name.
    """
    name = _bounded_text(metric, "metric", MAX_METRIC_LENGTH)
    if _METRIC.fullmatch(name) is None:
        raise InvalidUsageError(f"metric may contain only {METRIC_CHARSET}", field="metric")
    return name


def validate_stored_metric(metric: object) -> str:
    """Return `metric` if it is a non-empty name of at most 100 characters.

    For reading what is stored: names recorded before the charset existed are still billed.
    """
    return _bounded_text(metric, "metric", MAX_METRIC_LENGTH)


class Recorded(NamedTuple):
    """What became of one event: its id, and whether it had been stored before."""

    id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Stored:
    """What `store` did: each event's outcome, in order, and the drafts it touched.

    `drafts` are the ids (in id order, the order to lock them in) of the tenant's draft
    invoices whose period holds a newly stored event, found by the storing statement itself
    on PostgreSQL; None where they were not looked up (SQLite): `invoicing.drafts_covering`.
    """

    results: list[Recorded]
    drafts: list[str] | None


@dataclass(frozen=True, slots=True)
class MetricLimit:
    """The cap on the tenant's distinct metrics per month (`billing.metric_limit`), for `store`.

    On PostgreSQL the insert checks it itself when an event's metric is new to its month,
    under the tenant's lock named `lock_key` (migration 0024); where it cannot (SQLite, an
    autocommit batch stored in chunks), `guard` is entered around the insert: it raises before
    anything is stored.
    """

    limit: int
    lock_key: str
    guard: Callable[[], AbstractContextManager[None]]


def store(
    session: Session,
    tenant_id: str,
    events: Sequence[UsageInput],
    *,
    metric_limit: MetricLimit | None = None,
) -> Stored:
    """Store many events in a few round trips; say what became of each, in order, and which
    drafts the new events fall in (see `Stored`).

    Duplicates (of stored events, or repeats within the batch) get the first event's id; a key
    reused with another amount or time raises `IdempotencyConflictError`. A conflict can only be
    found after the insert; the caller then rolls its transaction back, as for any error.

    With `metric_limit`, events of a metric new to its month are refused past the limit
    (`TooManyMetricsError`, nothing stored): on PostgreSQL by the insert itself, which stores
    a single event, or a batch, in one statement whether its metrics are new or not.

    Raises:
        IdempotencyConflictError: a key was used for another amount or time.
        TooManyMetricsError: new metrics would bring a month over `metric_limit`.
    """
    unique = _dedupe(events)
    inserted, drafts = _insert_new(session, tenant_id, unique, metric_limit)
    existing: dict[tuple[str, str], str] = {}
    missing = [e for e in unique if (e.metric, e.idempotency_key) not in inserted]
    for start in range(0, len(missing), INSERT_CHUNK):
        existing.update(_match_existing(session, tenant_id, missing[start : start + INSERT_CHUNK]))
    if not existing and len(inserted) == len(events):  # all new (the usual case)
        return Stored(
            [Recorded(inserted[(e.metric, e.idempotency_key)], False) for e in events], drafts
        )
    results: list[Recorded] = []
    seen: set[tuple[str, str]] = set()
    for event in events:
        key = (event.metric, event.idempotency_key)
        if key in inserted and key not in seen:
            results.append(Recorded(inserted[key], duplicate=False))
        else:
            results.append(Recorded(inserted.get(key) or existing[key], duplicate=True))
        seen.add(key)
    return Stored(results, drafts)


Inserted = dict[tuple[str, str], str]
#: What an insert did: the new events' ids by (metric, key), and the drafts (`Stored.drafts`).
Written = tuple[Inserted, list[str]]


def _insert_new(
    session: Session, tenant_id: str, events: Sequence[UsageInput], limit: MetricLimit | None
) -> tuple[Inserted, list[str] | None]:
    """Insert the events whose keys are new; their ids by (metric, key), and the drafts."""
    if session.get_bind().dialect.name != "postgresql":
        with nullcontext() if limit is None else limit.guard():
            inserted: Inserted = {}
            for start in range(0, len(events), INSERT_CHUNK):
                chunk = events[start : start + INSERT_CHUNK]
                inserted.update(_insert_new_values(session, tenant_id, chunk))
        return inserted, None
    staged = len(events) >= COPY_THRESHOLD and not getattr(
        session.connection().connection.dbapi_connection, "autocommit", True
    )
    if staged:
        _copy_to_stage(session, events)
        return _from_stage(session, tenant_id, limit)
    if len(events) <= INSERT_CHUNK:
        return _insert_new_postgresql(session, tenant_id, events, limit)
    # autocommit, in chunks: each commits alone, so none may wait for a later one's check
    with nullcontext() if limit is None else limit.guard():
        return _insert_chunks(session, tenant_id, events)


def _insert_chunks(
    session: Session, tenant_id: str, events: Sequence[UsageInput]
) -> tuple[Inserted, list[str]]:
    inserted: Inserted = {}
    drafts: set[str] = set()
    for start in range(0, len(events), INSERT_CHUNK):
        chunk = events[start : start + INSERT_CHUNK]
        written = _insert_new_postgresql(session, tenant_id, chunk, None)
        inserted.update(written[0])
        drafts.update(written[1])
    return inserted, sorted(drafts)


def _insert_new_values(session: Session, tenant_id: str, events: Sequence[UsageInput]) -> Inserted:
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "tenant_id": tenant_id,
            "metric": e.metric,
            "amount": e.amount,
            "at_ts": e.at,
            "idempotency_key": e.idempotency_key,
            "metadata_json": None if e.metadata_json is None else json.loads(e.metadata_json),
            "created_at": now,
        }
        for e in events
    ]
    # One cached statement run with a list of parameter sets: SQLAlchemy's "insertmanyvalues"
    # sends it as one multi-row INSERT per page, compiled once per process.
    result = session.connection().execute(_insert_statement(session), rows)
    return {(metric, key): event_id for event_id, metric, key in result}


# PostgreSQL: `{source}` (the events, with their new ids) claims its keys in usage_event_keys;
# the events whose keys it claimed are stored. A concurrent sender of the same key waits on the
# key's row and then claims nothing, as ON CONFLICT on usage_events itself did before.
# With a metric limit, `unknown` is one row (the tenant's zone, the events' months and metrics)
# if an event's (month, metric) has no month row in usage_counters, else none: then nothing is
# locked or counted (the usual case). The month is the tenant's local one, as the counters'
# triggers key it (`billing.counters`), found as they find it (migration 0020): the local
# midnights once per wall-clock date of the events, `billing_period_start` only for an event
# those midnights do not hold. For a new pair `billing_metric_check` (migration 0024) takes the
# tenant's metric lock and checks the months; a refusal stores nothing and is the one row
# returned: NULL, the zone, the refusal (JSON). The same statement finds the tenant's drafts
# holding a stored event (rows with a NULL metric), which the caller re-prices: one round trip
# for what took three, and for a new metric one for what took five.
_CLAIM_AND_STORE = """
WITH source AS ({source}),
{unknown},
refused AS (
    SELECT u.zone, billing_metric_check(%(lock_key)s, %(tenant_id)s, %(limit)s::integer,
                                        u.months, u.metrics) AS refusal
    FROM unknown AS u
){emptied},
claimed AS (
    INSERT INTO usage_event_keys (tenant_id, metric, idempotency_key, at_ts, amount, event_id)
    SELECT %(tenant_id)s, metric, idempotency_key, at_ts, amount, id FROM source
    WHERE NOT EXISTS (SELECT FROM refused WHERE refusal IS NOT NULL)
    ON CONFLICT (tenant_id, metric, idempotency_key) DO NOTHING
    RETURNING event_id
),
stored AS (
    INSERT INTO usage_events
        (id, tenant_id, metric, amount, at_ts, idempotency_key, metadata_json, created_at)
    SELECT s.id, %(tenant_id)s, s.metric, s.amount, s.at_ts, s.idempotency_key,
           s.metadata_json, %(now)s
    FROM source AS s JOIN claimed AS c ON c.event_id = s.id
    RETURNING id, metric, idempotency_key, at_ts
)
SELECT id, metric, idempotency_key FROM stored
UNION ALL
SELECT i.id, NULL, NULL FROM invoices AS i
WHERE i.tenant_id = %(tenant_id)s AND i.status = 'draft'
  AND EXISTS (SELECT FROM stored AS s WHERE i.period_start <= s.at_ts AND s.at_ts < i.period_end)
UNION ALL
SELECT NULL, zone, refusal::text FROM refused WHERE refusal IS NOT NULL
"""
# The events' months for `unknown`, as the counters' triggers find them (see above).
_UNKNOWN_MONTHS = """
zone AS (SELECT coalesce(max(timezone), 'UTC') AS name FROM tenants WHERE id = %(tenant_id)s),
dated AS (
    SELECT s.metric, s.at_ts, z.name AS zone,
           CASE WHEN z.name <> 'UTC' THEN (s.at_ts AT TIME ZONE z.name)::date END AS d
    FROM source AS s, zone AS z
    WHERE %(limit)s::integer IS NOT NULL
),
dates AS MATERIALIZED (
    SELECT zone, d, billing_midnight(d, zone) AS lo, billing_midnight(d + 1, zone) AS hi,
           billing_midnight(date_trunc('month', d)::date, zone) AS mo
    FROM (SELECT DISTINCT zone, d FROM dated WHERE d IS NOT NULL) AS z
),
months AS (
    SELECT DISTINCT s.zone, s.metric,
           CASE WHEN s.d IS NULL THEN date_trunc('month', s.at_ts, 'UTC')
                WHEN dt.lo <= s.at_ts AND s.at_ts < dt.hi THEN dt.mo
                ELSE billing_period_start('month', s.at_ts, s.zone) END AS start
    FROM dated AS s LEFT JOIN dates AS dt ON dt.zone = s.zone AND dt.d = s.d
),
unknown AS (
    SELECT m.zone, array_agg(m.start) AS months, array_agg(m.metric) AS metrics
    FROM months AS m
    GROUP BY m.zone
    HAVING bool_or(NOT EXISTS (
        SELECT FROM usage_counters AS c
        WHERE c.tenant_id = %(tenant_id)s AND c.granularity = 'month' AND c.metric = m.metric
          AND c.period_start = m.start
    ))
)"""
# One event: its month found directly, no per-date CTEs (their planning and executor set-up
# were a third of the statement's server time over a bare claim-and-store). The month is the
# one `_UNKNOWN_MONTHS` finds: billing_period_start is what its per-date midnights shortcut.
_UNKNOWN_MONTH = """unknown AS (
    SELECT m.zone, ARRAY[m.start] AS months, ARRAY[%(metric)s::varchar] AS metrics
    FROM (
        SELECT zone.name AS zone, CASE
            WHEN zone.name = 'UTC' THEN date_trunc('month', %(at)s::timestamptz, 'UTC')
            ELSE billing_period_start('month', %(at)s::timestamptz, zone.name) END AS start
        FROM (SELECT coalesce(max(timezone), 'UTC') AS name FROM tenants
              WHERE id = %(tenant_id)s) AS zone
        WHERE %(limit)s::integer IS NOT NULL
    ) AS m
    WHERE NOT EXISTS (
        SELECT FROM usage_counters AS c
        WHERE c.tenant_id = %(tenant_id)s AND c.granularity = 'month'
          AND c.metric = %(metric)s::varchar AND c.period_start = m.start
    )
)"""
# One statement text whatever the batch size: the columns travel as arrays, so psycopg parses
# and prepares it once, instead of parsing a new 8,000-placeholder VALUES list per batch.
_UNNEST_INSERT = _CLAIM_AND_STORE.format(
    unknown=_UNKNOWN_MONTHS,
    emptied="",
    source="""
    SELECT * FROM unnest(%(ids)s::varchar[], %(metrics)s::varchar[], %(amounts)s::bigint[],
                         %(ats)s::timestamptz[], %(keys)s::varchar[], %(metadata)s::text[]::json[])
         AS u(id, metric, amount, at_ts, idempotency_key, metadata_json)""",
)


# One event (the usual HTTP or job call): its fields as scalars, not one-element arrays, which
# psycopg would dump through its array machinery (a fifth of the client's CPU per event). Its
# id is made by the server, as a staged batch's are: a UUID4 as text, like `new_id`'s, without
# the client's uuid4() (a third of the ledger's own CPU per event). `source` is read twice, so
# PostgreSQL runs it once (and a volatile function keeps it from being inlined): one id.
_ROW_INSERT = _CLAIM_AND_STORE.format(
    unknown=_UNKNOWN_MONTH,
    emptied="",
    source="""
    SELECT gen_random_uuid()::varchar AS id, %(metric)s::varchar AS metric,
           %(amount)s::bigint AS amount,
           %(at)s::timestamptz AS at_ts, %(key)s::varchar AS idempotency_key,
           %(metadata_json)s::text::json AS metadata_json""",
)


def _claimed(rows: Iterable[Any], limit: MetricLimit | None) -> Written:
    """The ids of the stored events by (metric, key), and the drafts.

    Raises:
        TooManyMetricsError: the statement refused the events (the metric limit).
    """
    inserted: Inserted = {}
    drafts: list[str] = []
    for row_id, metric, key in rows:
        if row_id is None:
            assert limit is not None, "only a statement given a limit refuses"
            raise _refusal(limit.limit, zone_name=metric, refusal=key)
        if metric is None:
            drafts.append(row_id)
        else:
            inserted[(metric, key)] = row_id
    return inserted, sorted(drafts)


def _refusal(limit: int, *, zone_name: str, refusal: str) -> TooManyMetricsError:
    """The error for `billing_metric_check`'s refusal (JSON: the month, its metrics, the
    ones added)."""
    found = json.loads(refusal)
    return TooManyMetricsError.over_limit(
        limit=limit,
        month=datetime.fromisoformat(found["month"]).astimezone(UTC),
        held=found["held"],
        added=found["added"],
        tz=zone(zone_name),
    )


def _limit_params(limit: MetricLimit | None) -> dict[str, Any]:
    if limit is None:
        return {"limit": None, "lock_key": None}
    return {"limit": limit.limit, "lock_key": limit.lock_key}


def _insert_new_postgresql(
    session: Session, tenant_id: str, events: Sequence[UsageInput], limit: MetricLimit | None
) -> Written:
    if len(events) == 1:
        (event,) = events
        row = {
            "tenant_id": tenant_id,
            "now": utcnow(),
            **_limit_params(limit),
            "metric": event.metric,
            "amount": event.amount,
            "at": event.at,
            "key": event.idempotency_key,
            "metadata_json": event.metadata_json,
        }
        return _claimed(driver_sql.rows(session, _ROW_INSERT, row), limit)
    params = {
        "tenant_id": tenant_id,
        "now": utcnow(),
        **_limit_params(limit),
        "ids": [new_id() for _ in events],
        "metrics": [e.metric for e in events],
        "amounts": [e.amount for e in events],
        "ats": [e.at for e in events],
        "keys": [e.idempotency_key for e in events],
        "metadata": [e.metadata_json for e in events],
    }
    return _claimed(driver_sql.rows(session, _UNNEST_INSERT, params), limit)


# COPY-stage, for batches inside a transaction: the events are COPYed (binary) into a temporary
# table of the session, then moved by one INSERT … SELECT … ON CONFLICT DO NOTHING, which also
# empties the stage (so a second batch in the same transaction starts empty). COPY parses no
# SQL per row; the usage_counters trigger fires once, for the one INSERT. ON COMMIT DELETE ROWS
# truncates the stage at commit, which keeps it small (autovacuum skips temporary tables). An
# autocommit connection takes the unnest INSERT instead: each statement would commit on its own.
COPY_THRESHOLD = 64
_STAGE_CREATE = """
CREATE TEMPORARY TABLE IF NOT EXISTS billing_usage_stage (
    id varchar NOT NULL DEFAULT gen_random_uuid()::text,
    metric varchar NOT NULL,
    amount bigint NOT NULL,
    at_ts timestamptz NOT NULL,
    idempotency_key varchar NOT NULL,
    metadata_json json
) ON COMMIT DELETE ROWS
"""
_STAGE_COPY = (
    "COPY billing_usage_stage (metric, amount, at_ts, idempotency_key, metadata_json) "
    "FROM STDIN (FORMAT BINARY)"
)
# json's binary form is its text: the metadata, encoded when validated, is sent as it is.
_STAGE_TYPES = ("varchar", "int8", "timestamptz", "varchar", "text")
# The stage is emptied by the statement that moves its events, also when it refuses them (the
# metric limit): a later batch in the transaction starts from an empty stage.
_FROM_STAGE = _CLAIM_AND_STORE.format(
    unknown=_UNKNOWN_MONTHS,
    source="SELECT * FROM billing_usage_stage",
    emptied=""",
emptied AS (DELETE FROM billing_usage_stage)""",
)


def _copy_to_stage(session: Session, events: Sequence[UsageInput]) -> None:
    # The statements go through SQLAlchemy, so a refusal (a counter out of range…) raises its
    # usual exceptions; COPY, which SQLAlchemy has no API for, has its errors wrapped alike.
    sql = session.connection()
    sql.exec_driver_sql(_STAGE_CREATE)
    connection = driver_sql.driver_connection(sql)
    try:
        with connection.cursor() as cursor, cursor.copy(_STAGE_COPY) as copy:
            copy.set_types(_STAGE_TYPES)
            for e in events:
                copy.write_row((e.metric, e.amount, e.at, e.idempotency_key, e.metadata_json))
    except psycopg.Error as error:
        raise DBAPIError.instance(_STAGE_COPY, None, error, psycopg.Error) from error


def _from_stage(session: Session, tenant_id: str, limit: MetricLimit | None) -> Written:
    params = {"tenant_id": tenant_id, "now": utcnow(), **_limit_params(limit)}
    return _claimed(driver_sql.rows(session, _FROM_STAGE, params), limit)


def _match_existing(
    session: Session, tenant_id: str, events: Sequence[UsageInput]
) -> dict[tuple[str, str], str]:
    wanted = {(e.metric, e.idempotency_key): e for e in events}
    found: dict[tuple[str, str], str] = {}
    for event_id, metric, key, amount, at_ts in stored_events(session, tenant_id, list(wanted)):
        sent = wanted[(metric, key)]
        if (amount, at_ts) != (sent.amount, sent.at):
            raise IdempotencyConflictError(
                f"idempotency key {key!r} for metric {metric!r} was already used for an event "
                f"with amount {amount} at {at_ts.isoformat()}",
                existing_id=event_id,
            )
        found[(metric, key)] = event_id
    if len(found) != len(wanted):  # only if a row vanished under us: never silently drop one
        raise RuntimeError("a conflicting usage event disappeared while recording")
    return found


def stored_events(
    session: Session, tenant_id: str, keys: Sequence[tuple[str, str]]
) -> list[tuple[str, str, str, int, datetime]]:
    """The tenant's stored events with these (metric, idempotency key) pairs, as (id, metric,
    key, amount, at); on PostgreSQL read from `usage_event_keys`, one primary key lookup each."""
    if session.get_bind().dialect.name == "postgresql":
        keys_table = usage_event_keys.c
        query = select(
            keys_table.event_id,
            keys_table.metric,
            keys_table.idempotency_key,
            keys_table.amount,
            keys_table.at_ts,
        ).where(
            keys_table.tenant_id == tenant_id,
            tuple_(keys_table.metric, keys_table.idempotency_key).in_(keys),
        )
    else:
        pairs = (and_(UsageEvent.metric == m, UsageEvent.idempotency_key == k) for m, k in keys)
        query = select(
            UsageEvent.id,
            UsageEvent.metric,
            UsageEvent.idempotency_key,
            UsageEvent.amount,
            UsageEvent.at_ts,
        ).where(UsageEvent.tenant_id == tenant_id, or_(*pairs))
    return [tuple(row) for row in session.execute(query)]


@functools.cache
def _insert_for(dialect: str) -> Any:
    table = cast(Table, UsageEvent.__table__)
    if dialect != "sqlite":  # PostgreSQL claims keys first: `_insert_new_postgresql`
        raise NotImplementedError(f"usage recording supports SQLite and PostgreSQL, not {dialect}")
    return (
        sqlite.insert(table)
        .on_conflict_do_nothing(index_elements=["tenant_id", "metric", "idempotency_key"])
        .returning(table.c.id, table.c.metric, table.c.idempotency_key)
    )


def _insert_statement(session: Session) -> Any:
    return _insert_for(session.get_bind().dialect.name)


def _dedupe(events: Iterable[UsageInput]) -> list[UsageInput]:
    seen: dict[tuple[str, str], UsageInput] = {}
    for event in events:
        key = (event.metric, event.idempotency_key)
        first = seen.setdefault(key, event)
        if (first.amount, first.at) != (event.amount, event.at):
            raise IdempotencyConflictError(
                f"idempotency key {event.idempotency_key!r} for metric {event.metric!r} appears "
                "twice in the batch with different amounts or times"
            )
    return list(seen.values())


def _bounded_text(value: object, field: str, max_length: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidUsageError(f"{field} must be a non-empty string", field=field)
    if len(value) > max_length:
        raise InvalidUsageError(f"{field} is longer than {max_length} characters", field=field)
    return value


def _amount(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUsageError(
            f"amount must be an integer count of units, not {type(value).__name__}",
            field="amount",
        )
    if value < 0 or value > MAX_AMOUNT:
        raise InvalidUsageError("amount must be between 0 and 2**63-1", field="amount")
    return value


def _aware_utc(value: object) -> datetime:
    if type(value) is datetime and value.tzinfo is UTC:  # the usual case: nothing to convert
        return value
    if not isinstance(value, datetime):
        raise InvalidUsageError("at must be a datetime", field="at")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidUsageError(
            "at must be timezone-aware (naive datetimes are ambiguous)", field="at"
        )
    return value.astimezone(UTC)


def _in_window(at: datetime, now: datetime | None, max_age: timedelta | None) -> datetime:
    if now is None:
        return at
    if at > now + MAX_FUTURE:
        raise InvalidUsageError("at is more than 5 minutes in the future", field="at")
    if max_age is not None and at < now - max_age:
        raise InvalidUsageError(
            f"at is older than {max_age.days} days: send older usage through the Python API "
            "(backfill)",
            field="at",
        )
    return at


# Compact, NaN refused; made once (`json.dumps` with options builds an encoder per call).
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _metadata(value: object) -> str | None:
    if value is None:
        return None
    if type(value) is not dict:  # a dict (the usual case) skips the ABC check and the copy
        if not isinstance(value, Mapping):
            raise InvalidUsageError("metadata must be a JSON object", field="metadata")
        value = dict(value)
    try:
        encoded = _JSON.encode(value)
    except (TypeError, ValueError) as error:
        raise InvalidUsageError(
            f"metadata is not JSON-serialisable: {error}", field="metadata"
        ) from error
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidUsageError("metadata is larger than 16 KiB encoded", field="metadata")
    return encoded
