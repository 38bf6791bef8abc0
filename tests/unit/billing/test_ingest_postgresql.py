"""Ingest on PostgreSQL: batches go through a COPY-staged INSERT; per event, they end as before.

The reference is the path batches took before (one `INSERT … SELECT FROM unnest(arrays)`),
still taken on autocommit connections: the same batch, sent both ways, stores the same rows and
counters and says the same of each event (new or duplicate, and which stored row it is).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select, text
from sqlalchemy.event import listen
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService, IdempotencyConflictError, TooManyMetricsError, ledger
from billing.db import make_engine, make_session_factory
from billing.models import Invoice, UsageEvent
from billing.tenants import set_tenant

pytestmark = pytest.mark.postgres

AT = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg_factory(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


@pytest.fixture
def autocommit_engine(pg_engine: Engine) -> Iterator[Engine]:
    engine = make_engine(pg_engine.url.render_as_string(hide_password=False))
    engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def event(key: int, amount: int = 1, metric: str = "tokens", **extra: Any) -> dict[str, Any]:
    return {
        "metric": metric,
        "amount": amount,
        "at": AT + timedelta(seconds=key),
        "idempotency_key": f"k{key}",
        **extra,
    }


def staged(session: Session) -> bool:
    """Whether this session's connection has the COPY staging table (a temporary table)."""
    name = session.execute(text("SELECT to_regclass('pg_temp.billing_usage_stage')")).scalar()
    return name is not None


def stored(session: Session) -> list[tuple[Any, ...]]:
    rows = session.execute(
        select(
            UsageEvent.tenant_id,
            UsageEvent.metric,
            UsageEvent.idempotency_key,
            UsageEvent.amount,
            UsageEvent.at_ts,
            UsageEvent.metadata_json,
        ).order_by(UsageEvent.tenant_id, UsageEvent.metric, UsageEvent.idempotency_key)
    ).all()
    return [tuple(row) for row in rows]


def counters(session: Session) -> list[tuple[Any, ...]]:
    rows = session.execute(
        text(
            "SELECT tenant_id, metric, granularity, period_start, total FROM usage_counters "
            "ORDER BY 1, 2, 3, 4"
        )
    ).all()
    return [tuple(row) for row in rows]


def outcome(
    session: Session, before: Sequence[dict[str, Any]], batch: Sequence[dict[str, Any]]
) -> tuple[object, list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Store `before` one by one, then `batch`; what each event became (`said`), the rows,
    the counters."""
    bs = BillingService(session=session, tenant_id="t1")
    for item in before:
        bs.record_usage(**item)
    try:
        recorded = bs.ingest(batch)
    except IdempotencyConflictError:
        return "conflict", [], []
    return said(session, recorded), stored(session), counters(session)


def said(session: Session, recorded: Sequence[ledger.Recorded]) -> list[tuple[bool, str]]:
    """Each event's outcome: (duplicate?, the (metric, key) of the stored row whose id it got)."""
    keys_by_id = dict(
        session.execute(
            select(UsageEvent.id, func.concat(UsageEvent.metric, "/", UsageEvent.idempotency_key))
        ).all()
    )
    return [(r.duplicate, keys_by_id[r.id]) for r in recorded]


events = st.lists(
    st.builds(
        event,
        key=st.integers(0, 30),
        amount=st.integers(0, 3),
        metric=st.sampled_from(["tokens", "calls"]),
        metadata=st.none() | st.fixed_dictionaries({"model": st.sampled_from(["a", "é"])}),
    ),
    max_size=60,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=st.lists(st.builds(event, key=st.integers(0, 30)), max_size=5), batch=events)
def test_copy_stage_and_the_unnest_insert_end_each_event_the_same(
    pg_factory: sessionmaker[Session],
    before: list[dict[str, Any]],
    batch: list[dict[str, Any]],
) -> None:
    results = []
    for threshold in (2, 10**9):  # COPY-stage for every batch of 2 or more; then never
        with pytest.MonkeyPatch.context() as patch, pg_factory() as session:
            patch.setattr(ledger, "COPY_THRESHOLD", threshold)
            results.append(outcome(session, before, batch))
            session.rollback()
    assert results[0] == results[1]


def test_a_large_batch_goes_through_the_staging_table_and_is_stored_in_full(
    pg_engine: Engine, pg_factory: sessionmaker[Session]
) -> None:
    batch = [event(k, amount=k, metadata={"n": k}) for k in range(3000)]
    with pg_engine.connect() as connection:  # one connection: its temporary table is seen after
        with Session(bind=connection) as session, session.begin():
            ids = BillingService(session=session, tenant_id="t1").record_usage_batch(batch)
            assert staged(session)
        # the stage was emptied at commit
        assert connection.execute(text("SELECT count(*) FROM billing_usage_stage")).scalar() == 0
    with pg_factory() as session:
        rows = session.execute(
            select(UsageEvent.id, UsageEvent.idempotency_key, UsageEvent.metadata_json)
        ).all()
        assert counters(session)[0][-1] == sum(range(3000))  # the day's counter
    assert sorted((i, f"k{k}", {"n": k}) for k, i in enumerate(ids)) == sorted(map(tuple, rows))


def test_two_batches_in_one_transaction_each_start_from_an_empty_stage(
    pg_factory: sessionmaker[Session],
) -> None:
    with pg_factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1")
        first = bs.ingest([event(k) for k in range(100)])
        second = bs.ingest([event(k) for k in range(50, 200)])
        assert session.execute(text("SELECT count(*) FROM billing_usage_stage")).scalar() == 0
    assert [r.duplicate for r in first] == [False] * 100
    assert [r.duplicate for r in second] == [True] * 50 + [False] * 100
    assert [r.id for r in second[:50]] == [r.id for r in first[50:]]
    with pg_factory() as session:
        assert session.execute(select(func.count()).select_from(UsageEvent)).scalar() == 200


def test_a_conflict_in_a_staged_batch_raises_and_its_transaction_stores_nothing(
    pg_factory: sessionmaker[Session],
) -> None:
    with pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(**event(7))
    batch = [event(k) for k in range(100)]
    batch[30] = event(7, amount=2)
    with pytest.raises(IdempotencyConflictError), pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage_batch(batch)
    with pg_factory() as session:
        assert session.execute(select(func.count()).select_from(UsageEvent)).scalar() == 1
        assert counters(session)[0][-1] == 1


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sent=st.lists(
        st.builds(
            event,
            key=st.integers(0, 8),
            metric=st.sampled_from(["tokens", "calls"]),
            metadata=st.none() | st.fixed_dictionaries({"model": st.sampled_from(["a", "é"])}),
        ),
        min_size=2,
        max_size=12,
    )
)
def test_events_sent_one_by_one_end_as_the_same_events_sent_as_one_batch(
    pg_factory: sessionmaker[Session], sent: list[dict[str, Any]]
) -> None:
    """A single event has a statement of its own (scalar parameters); it stores what the
    batch statement (arrays) stores, and says the same of each event."""
    results = []
    for one_by_one in (True, False):
        with pytest.MonkeyPatch.context() as patch, pg_factory() as session:
            patch.setattr(ledger, "COPY_THRESHOLD", 10**9)  # batches: the unnest statement
            bs = BillingService(session=session, tenant_id="t1")
            recorded = [bs.ingest_event(**e) for e in sent] if one_by_one else bs.ingest(sent)
            results.append((said(session, recorded), stored(session), counters(session)))
            session.rollback()
    assert results[0] == results[1]


@pytest.mark.parametrize("max_metrics", [1000, None])
def test_an_autocommit_connection_takes_the_single_statement_path(
    autocommit_engine: Engine, max_metrics: int | None
) -> None:
    """In chunks, with the metric limit checked first or without one (None)."""
    with make_session_factory(autocommit_engine)() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=max_metrics)
        first = bs.ingest([event(k, amount=k) for k in range(1500)])
        assert not staged(session)  # each statement commits alone: no stage to lose rows from
        again = bs.ingest([event(k, amount=k) for k in range(1500)])
        total = session.execute(select(func.sum(UsageEvent.amount))).scalar()
    assert [r.id for r in again] == [r.id for r in first]
    assert len({r.id for r in first}) == 1500
    assert {r.duplicate for r in first} == {False}  # in chunks of 1,000: each chunk's ids kept
    assert {r.duplicate for r in again} == {True}
    assert total == sum(range(1500))


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_single_event_is_stored_as_sent_in_a_transaction_or_not(
    pg_factory: sessionmaker[Session], autocommit_engine: Engine, autocommit: bool
) -> None:
    factory = make_session_factory(autocommit_engine) if autocommit else pg_factory
    sent = event(5, amount=9, metadata={"model": "é", "n": [1, 2]})
    sent["at"] = sent["at"].astimezone(timezone(timedelta(hours=-5)))
    with factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1")
        first = bs.ingest_event(**sent)
        again = bs.ingest_event(**sent)
        with pytest.raises(IdempotencyConflictError) as conflict:
            bs.record_usage(**{**sent, "amount": 10})
        assert conflict.value.existing_id == first.id
    assert (first.duplicate, again.duplicate, again.id) == (False, True, first.id)
    with pg_factory() as session:
        assert stored(session) == [
            ("t1", "tokens", "k5", 9, AT + timedelta(seconds=5), {"model": "é", "n": [1, 2]})
        ]
        assert [c[-1] for c in counters(session)] == [9, 9]  # the day's and the month's


@pytest.mark.parametrize("where", ["key", "counter"])
def test_the_database_refusing_a_staged_batch_raises_sqlalchemys_error(
    pg_factory: sessionmaker[Session], where: str
) -> None:
    """The API answers SQLAlchemy's DBAPIError with a 400; COPY's refusals must be one too."""
    batch = [event(k) for k in range(100)]
    if where == "key":  # refused by COPY itself: text can't hold NUL
        batch[50]["idempotency_key"] = "a\x00b"
    else:  # refused by the INSERT's counter trigger: the day's total would overflow
        batch[50]["amount"] = batch[51]["amount"] = 2**63 - 1
    with pytest.raises(DBAPIError) as refused, pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage_batch(batch)
    assert isinstance(refused.value.orig, psycopg.Error)  # the driver's own error, kept
    if where == "key":  # named by its statement, as SQLAlchemy names the ones it runs
        assert refused.value.statement.startswith("COPY billing_usage_stage ")
    with pg_factory() as session:
        assert session.execute(select(func.count()).select_from(UsageEvent)).scalar() == 0


@pytest.mark.parametrize("size", [1, 10])
def test_an_event_the_driver_refuses_raises_sqlalchemys_error_and_stores_nothing(
    autocommit_engine: Engine, pg_factory: sessionmaker[Session], size: int
) -> None:
    """The claim-and-store statement runs on the driver's cursor (no listener here), its errors
    raised as SQLAlchemy's, which the API answers: one event, and a batch on autocommit."""
    batch = [event(k) for k in range(size)]
    batch[-1]["idempotency_key"] = "a\x00b"  # text cannot hold NUL
    factory = pg_factory if size == 1 else make_session_factory(autocommit_engine)
    with pytest.raises(DataError), factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage_batch(batch)
    with pg_factory() as session:
        assert session.execute(select(func.count()).select_from(UsageEvent)).scalar() == 0


def test_a_connection_lost_under_an_insert_is_invalidated_and_the_next_one_works(
    pg_engine: Engine, pg_factory: sessionmaker[Session]
) -> None:
    with pg_factory() as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with pg_engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as lost:
            BillingService(session=session, tenant_id="t1").record_usage(**event(1))
        assert lost.value.connection_invalidated
    with pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(**event(1))
    with pg_factory() as session:
        assert [c[-1] for c in counters(session)] == [1, 1]


def test_an_engine_echoing_its_sql_logs_the_insert(
    pg_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """`SQL_ECHO` shows every statement, the one the ledger runs on the driver's cursor too."""
    engine = make_engine(pg_engine.url.render_as_string(hide_password=False), echo=True)
    try:
        with (
            caplog.at_level(logging.INFO, "sqlalchemy.engine"),
            make_session_factory(engine).begin() as session,
        ):
            BillingService(session=session, tenant_id="t1").record_usage(**event(1))
    finally:
        engine.dispose()
    assert any("INSERT INTO usage_event_keys" in r.getMessage() for r in caplog.records)


def statements(session: Session) -> list[str]:
    """The SQL statements this session's connection runs from now on (first words)."""
    sent: list[str] = []
    listen(session.connection(), "before_cursor_execute", lambda *a: sent.append(a[2][:40]))
    return sent


def test_a_duplicate_is_looked_up_in_the_key_table_not_the_monthly_partitions(
    pg_factory: sessionmaker[Session],
) -> None:
    """`stored_events` reads `usage_event_keys` by its primary key on PostgreSQL."""
    with pg_factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1")
        first = bs.ingest_event(**event(1))
        sent = statements(session)
        again = bs.ingest_event(**event(1))
    assert (again.duplicate, again.id) == (True, first.id)
    assert any(s.startswith("SELECT usage_event_keys.event_id") for s in sent)
    assert not any(s.startswith("SELECT usage_events.") for s in sent)


@pytest.mark.parametrize("limit", [None, 1000])
def test_an_event_of_a_metric_known_in_its_month_is_stored_by_one_statement(
    pg_factory: sessionmaker[Session], limit: int | None
) -> None:
    """The metric limit's lookup and the drafts' are part of the insert: one round trip."""
    with pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(**event(1))
    with pg_factory.begin() as session:
        sent = statements(session)
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=limit)
        recorded = bs.ingest_event(**event(2, amount=5))
        assert len(sent) == 1
        again = bs.ingest_event(**event(2, amount=5))  # then reads the stored one's id
    assert (recorded.duplicate, again.duplicate, again.id) == (False, True, recorded.id)
    with pg_factory() as session:
        assert [c[-1] for c in counters(session)] == [6, 6]


def test_a_metric_new_to_the_events_utc_month_is_checked_against_the_limit(
    pg_factory: sessionmaker[Session],
) -> None:
    """The month is the UTC month of `at`, whatever its offset: 20:00 on January 31st at
    UTC-5 is February, where "tokens" is new, and February is full (limit 1)."""
    feb = datetime(2025, 2, 1, tzinfo=UTC)
    with pg_factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1)
        bs.record_usage(metric="tokens", amount=1, at=feb - timedelta(days=1), idempotency_key="a")
        bs.record_usage(metric="calls", amount=1, at=feb, idempotency_key="b")
    late_january = datetime(2025, 1, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    with pytest.raises(TooManyMetricsError), pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1).record_usage(
            metric="tokens", amount=1, at=late_january, idempotency_key="c"
        )
    with pg_factory.begin() as session:  # the last microsecond of January (UTC) is January
        sent = statements(session)
        BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1).record_usage(
            metric="tokens", amount=1, at=feb - timedelta(microseconds=1), idempotency_key="d"
        )
        assert len(sent) == 1
    with pg_factory() as session:
        assert [k for _, _, k, *_ in stored(session)] == ["b", "a", "d"]


def test_a_zoned_tenants_event_is_checked_against_its_local_month(
    pg_factory: sessionmaker[Session],
) -> None:
    """For a tenant in New York (UTC-5 in winter) 04:59:59 UTC on February 1st is January:
    "tokens", counted there, is known (one statement); at 05:00 it is February, where "calls"
    fills the limit of 1."""
    feb = datetime(2025, 2, 1, tzinfo=UTC)
    with pg_factory.begin() as session:
        set_tenant(session, "t1", timezone="America/New_York")
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1)
        bs.record_usage(metric="tokens", amount=1, at=feb + timedelta(hours=1), idempotency_key="a")
        bs.record_usage(metric="calls", amount=1, at=feb + timedelta(days=9), idempotency_key="b")
    with pg_factory.begin() as session:
        sent = statements(session)
        BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1).record_usage(
            metric="tokens", amount=1, at=feb + timedelta(hours=5, seconds=-1), idempotency_key="c"
        )
        assert len(sent) == 1
    with pytest.raises(TooManyMetricsError), pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1).record_usage(
            metric="tokens", amount=1, at=feb + timedelta(hours=5), idempotency_key="d"
        )
    with pg_factory() as session:
        assert [k for _, _, k, *_ in stored(session)] == ["b", "a", "c"]


def test_store_names_the_drafts_its_new_events_fall_in(
    pg_factory: sessionmaker[Session],
) -> None:
    """Found by the insert itself: drafts of the tenant holding a new (not duplicate) event."""
    jan, feb = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC)
    with pg_factory.begin() as session:
        for tenant, status in (("t1", "draft"), ("t2", "draft"), ("t3", "open")):
            session.add(
                Invoice(
                    tenant_id=tenant,
                    period_start=jan,
                    period_end=feb,
                    currency="usd",
                    status=status,
                    total_amount=0,
                )
            )
        session.flush()
        draft = session.execute(select(Invoice.id).where(Invoice.tenant_id == "t1")).scalar()

        def drafts(tenant: str, key: int, at: datetime) -> list[str] | None:
            sent = ledger.validate_usage(**{**event(key), "at": at})
            return ledger.store(session, tenant, [sent]).drafts

        assert drafts("t1", 1, jan) == [draft]
        assert drafts("t1", 1, jan) == []  # a duplicate
        assert drafts("t1", 2, feb) == []  # the next period
        assert drafts("t1", 3, feb - timedelta(microseconds=1)) == [draft]
        assert drafts("t3", 4, jan) == []  # finalized


def test_a_staged_batch_of_known_metrics_checks_them_in_its_insert(
    pg_factory: sessionmaker[Session],
) -> None:
    with pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(**event(0))
    with pg_factory.begin() as session:
        sent = statements(session)
        BillingService(session=session, tenant_id="t1").record_usage_batch(
            [event(k) for k in range(1, 101)]
        )
    assert [s.split()[0] for s in sent] == ["CREATE", "WITH"]  # and COPY, outside SQLAlchemy


def test_a_staged_batch_bringing_a_new_metric_is_checked_and_stored_by_one_statement(
    pg_factory: sessionmaker[Session],
) -> None:
    """The insert that finds "calls" new to the month takes the tenant's lock, reads the
    month's metrics and stores the batch (migration 0024); a batch over the limit leaves nothing
    stored and an empty stage."""
    with pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(**event(0))
    batch = [event(k, metric=("tokens", "calls")[k % 2]) for k in range(1, 101)]
    with pytest.raises(TooManyMetricsError), pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1).ingest(batch)
    with pg_factory.begin() as session:
        sent = statements(session)
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=2)
        recorded = bs.ingest(batch)
        assert [" ".join(s.split()[:2]) for s in sent] == ["CREATE TEMPORARY", "WITH source"]
        assert session.execute(text("SELECT count(*) FROM billing_usage_stage")).scalar() == 0
        assert advisory_locks_held(session) == 1  # the tenant's metric lock, held to commit
    assert [r.duplicate for r in recorded] == [False] * 100
    with pg_factory() as session:
        assert len(stored(session)) == 101
        assert sorted(c[-1] for c in counters(session)) == [50, 50, 51, 51]


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_single_event_of_a_new_metric_is_checked_and_stored_by_one_statement(
    pg_factory: sessionmaker[Session], autocommit_engine: Engine, autocommit: bool
) -> None:
    """Taken or refused, one statement; on an autocommit connection the lock is given back
    when the statement commits."""
    factory = make_session_factory(autocommit_engine) if autocommit else pg_factory
    with factory() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1)
        sent = statements(session)
        bs.record_usage(**event(1))
        with pytest.raises(TooManyMetricsError) as refused:
            bs.record_usage(**event(2, metric="calls"))
        assert [s.split()[0] for s in sent] == ["WITH", "WITH"]
        assert advisory_locks_held(session) == (0 if autocommit else 1)
        session.commit()
    assert str(refused.value) == (
        "the tenant has 1 distinct metrics in 2025-01 (UTC) and these events add 1: "
        "MAX_METRICS_PER_TENANT is 1"
    )
    with pg_factory() as session:
        assert [m for _, m, *_ in stored(session)] == ["tokens"]


def test_an_autocommit_batch_in_chunks_is_checked_before_its_first_chunk(
    autocommit_engine: Engine,
) -> None:
    """Each chunk commits alone, so the limit is checked once for the batch, before any."""
    with make_session_factory(autocommit_engine)() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1)
        bs.record_usage(**event(0))
        batch = [event(k, metric="tokens" if k < 1200 else "calls") for k in range(1, 1500)]
        with pytest.raises(TooManyMetricsError):
            bs.ingest(batch)
        assert advisory_locks_held(session) == 0
    with make_session_factory(autocommit_engine)() as session:
        assert len(stored(session)) == 1


def advisory_locks_held(session: Session) -> int:
    """Exclusive advisory locks this session holds: the tenant's metric lock (the zone's lock,
    taken by the counters' trigger, is shared)."""
    query = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' "
        "AND pid = pg_backend_pid()"
    )
    return session.execute(query).scalar_one()


def test_a_staged_batch_refused_by_the_limit_leaves_nothing_for_the_next_batch(
    pg_factory: sessionmaker[Session],
) -> None:
    """A caller that goes on in its transaction after the refusal stores only what it sends
    next: the refused batch does not stay in the stage."""
    with pg_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(**event(0))
    with pg_factory.begin() as session:
        bs = BillingService(session=session, tenant_id="t1", max_metrics_per_tenant=1)
        with pytest.raises(TooManyMetricsError):
            bs.ingest([event(k, metric="calls") for k in range(1, 101)])
        recorded = bs.ingest([event(k) for k in range(1, 101)])
    assert [r.duplicate for r in recorded] == [False] * 100
    with pg_factory() as session:
        assert {m for _, m, *_ in stored(session)} == {"tokens"}
        assert len(stored(session)) == 101
