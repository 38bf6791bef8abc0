"""record_usage: stored once per (tenant, metric, key); bad input stores nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from types import MappingProxyType

import pytest
from sqlalchemy import func, select

from billing import BillingService, IdempotencyConflictError, InvalidUsageError, ledger
from billing.models import UsageEvent

AT = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


def count(session) -> int:
    return session.execute(select(func.count()).select_from(UsageEvent)).scalar_one()


def record(session, tenant="t1", **overrides) -> str:
    fields = {"metric": "tokens", "amount": 42, "at": AT, "idempotency_key": "req-42"}
    fields.update(overrides)
    return BillingService(session=session, tenant_id=tenant).record_usage(**fields)


def test_record_usage_stores_the_event_and_returns_its_id(session) -> None:
    event_id = record(session, metadata={"model": "gpt"})
    stored = session.get(UsageEvent, event_id)
    assert (stored.tenant_id, stored.metric, stored.amount) == ("t1", "tokens", 42)
    assert stored.at_ts == AT
    assert stored.metadata_json == {"model": "gpt"}


def test_the_same_event_again_returns_the_first_id_and_stores_nothing(session) -> None:
    first = record(session)
    assert record(session) == first
    assert record(session, metadata={"other": "metadata is not part of identity"}) == first
    assert count(session) == 1


def test_the_same_instant_in_another_offset_is_the_same_event(session) -> None:
    first = record(session)
    assert record(session, at=AT.astimezone(timezone(timedelta(hours=-5)))) == first


@pytest.mark.parametrize("change", [{"amount": 43}, {"at": AT + timedelta(seconds=1)}])
def test_the_same_key_with_another_amount_or_time_conflicts(session, change) -> None:
    first = record(session)
    with pytest.raises(IdempotencyConflictError) as caught:
        record(session, **change)
    assert caught.value.existing_id == first
    assert "was already used for an event with amount 42 at 2025-" in str(caught.value)
    assert count(session) == 1


def test_keys_are_per_tenant_and_per_metric(session) -> None:
    a = record(session, tenant="A")
    b = record(session, tenant="B")
    c = record(session, tenant="A", metric="calls")
    assert len({a, b, c}) == 3
    assert count(session) == 3


NOT_AN_INTEGER = "amount must be an integer count of units, not"
NAIVE = "at must be timezone-aware (naive datetimes are ambiguous)"


class NoOffset(tzinfo):
    """A zone that gives no offset: a datetime in it is naive for Python."""

    def utcoffset(self, dt: datetime | None) -> None:
        return None

    def dst(self, dt: datetime | None) -> None:
        return None

    def tzname(self, dt: datetime | None) -> None:
        return None


NOT_SERIALISABLE = "metadata is not JSON-serialisable:"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("metric", "", "metric must be a non-empty string"),
        ("metric", "   ", "metric must be a non-empty string"),
        ("metric", "m" * 101, "metric is longer than 100 characters"),
        ("metric", None, "metric must be a non-empty string"),
        ("idempotency_key", "", "idempotency_key must be a non-empty string"),
        ("idempotency_key", "k" * 256, "idempotency_key is longer than 255 characters"),
        ("amount", -1, "amount must be between 0 and 2**63-1"),
        ("amount", 1.5, f"{NOT_AN_INTEGER} float"),
        ("amount", 2.0, f"{NOT_AN_INTEGER} float"),
        ("amount", "3", f"{NOT_AN_INTEGER} str"),
        ("amount", True, f"{NOT_AN_INTEGER} bool"),
        ("amount", 2**63, "amount must be between 0 and 2**63-1"),
        ("at", datetime(2025, 1, 1), NAIVE),
        ("at", datetime(2025, 1, 1, tzinfo=NoOffset()), NAIVE),
        ("at", "2025-01-01T00:00:00Z", "at must be a datetime"),
        ("metadata", ["not", "an", "object"], "metadata must be a JSON object"),
        ("metadata", {"big": "x" * (16 * 1024)}, "metadata is larger than 16 KiB encoded"),
        ("metadata", {"nan": float("nan")}, f"{NOT_SERIALISABLE} Out of range float values"),
        ("metadata", {"obj": object()}, f"{NOT_SERIALISABLE} Object of type object is not"),
    ],
)
def test_bad_input_raises_invalid_usage_and_stores_nothing(session, field, value, message) -> None:
    with pytest.raises(InvalidUsageError) as caught:
        record(session, **{field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(message)
    assert count(session) == 0


def test_metadata_of_exactly_16_kib_encoded_is_stored(session) -> None:
    big = "x" * (16 * 1024 - len('{"big":""}'))
    event_id = record(session, metadata={"big": big})
    assert session.get(UsageEvent, event_id).metadata_json == {"big": big}


def test_metadata_given_as_another_mapping_is_stored_as_its_json_object(session) -> None:
    event_id = record(session, metadata=MappingProxyType({"model": "gpt", "n": 2}))
    assert session.get(UsageEvent, event_id).metadata_json == {"model": "gpt", "n": 2}


@pytest.mark.parametrize(
    "metric",
    [
        "tokens\n2025-01-01 acme 0",  # a forged line in `billing aggregate` output
        "tokens\x1b[31m",  # ANSI escape
        "\u202etokens",  # bidi override
        "to\u200bkens",  # zero-width space
        "api calls",
        "tokens\t",
        "tökens",  # letters are ASCII: no look-alikes
        "tokens;drop",
        "tokens\n",  # a trailing newline is not the end of the name
    ],
)
def test_a_metric_outside_the_charset_is_refused_and_stores_nothing(session, metric) -> None:
    with pytest.raises(InvalidUsageError, match="letters, digits and _ . - : /") as caught:
        record(session, metric=metric)
    assert caught.value.field == "metric"
    assert count(session) == 0


@pytest.mark.parametrize("metric", ["api.calls", "gpt-4:input/tokens", "GB_stored", "x", "m" * 100])
def test_metrics_of_the_charset_up_to_100_characters_are_recorded(session, metric) -> None:
    record(session, metric=metric)
    assert count(session) == 1


def test_a_key_of_exactly_255_characters_is_recorded(session) -> None:
    record(session, idempotency_key="k" * 255)
    assert count(session) == 1


def test_a_batch_with_a_metric_outside_the_charset_stores_nothing(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    batch = [
        {"metric": "tokens", "amount": 1, "at": AT, "idempotency_key": "k1"},
        {"metric": "tok\nens", "amount": 1, "at": AT, "idempotency_key": "k2"},
    ]
    with pytest.raises(InvalidUsageError) as caught:
        bs.record_usage_batch(batch)
    assert caught.value.field == "events[1].metric"
    assert count(session) == 0


def test_a_key_another_tenant_used_is_matched_against_this_tenant_s_event_only(session) -> None:
    theirs = record(session, tenant="A", amount=1)
    mine = record(session, tenant="B", amount=2)
    # B sends its event again: only B's row may answer, not A's with another amount.
    assert record(session, tenant="B", amount=2) == mine
    bs = BillingService(session=session, tenant_id="B")
    again = {"metric": "tokens", "amount": 2, "at": AT, "idempotency_key": "req-42"}
    assert bs.record_usage_batch([again, {**again, "idempotency_key": "new"}])[0] == mine
    assert record(session, tenant="A", amount=1) == theirs
    assert count(session) == 3


def test_a_key_used_for_two_metrics_is_matched_against_its_own_metric_s_event(session) -> None:
    tokens = record(session, metric="tokens", amount=1)
    calls = record(session, metric="calls", amount=2)
    assert record(session, metric="tokens", amount=1) == tokens
    assert record(session, metric="calls", amount=2) == calls
    assert count(session) == 2


def test_usage_more_than_5_minutes_ahead_of_the_clock_is_refused(session) -> None:
    def service(now):
        return BillingService(session=session, tenant_id="t1", now=lambda: now)

    fields = {"metric": "tokens", "amount": 1, "idempotency_key": "k"}
    with pytest.raises(
        InvalidUsageError, match="^at is more than 5 minutes in the future$"
    ) as caught:
        service(AT - timedelta(minutes=5, microseconds=1)).record_usage(**fields, at=AT)
    assert caught.value.field == "at"
    with pytest.raises(InvalidUsageError) as caught:
        service(AT - timedelta(minutes=6)).record_usage_batch([{**fields, "at": AT}])
    assert caught.value.field == "events[0].at"
    assert count(session) == 0
    service(AT - timedelta(minutes=5)).record_usage(**fields, at=AT)
    assert count(session) == 1


def test_the_python_api_takes_old_usage_for_backfills(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")  # the real clock, no max age
    bs.record_usage(
        metric="tokens", amount=1, at=datetime(2001, 1, 1, tzinfo=UTC), idempotency_key="k"
    )
    assert count(session) == 1


def test_a_max_usage_age_refuses_older_usage(session) -> None:
    bs = BillingService(
        session=session, tenant_id="t1", now=lambda: AT, max_usage_age=timedelta(days=35)
    )
    bs.record_usage(metric="tokens", amount=1, at=AT - timedelta(days=35), idempotency_key="a")
    older = r"^at is older than 35 days: send older usage through the Python API \(backfill\)$"
    with pytest.raises(InvalidUsageError, match=older) as caught:
        bs.record_usage(
            metric="tokens", amount=1, at=AT - timedelta(days=35, seconds=1), idempotency_key="b"
        )
    assert caught.value.field == "at"
    assert count(session) == 1


def test_an_empty_tenant_is_refused() -> None:
    with pytest.raises(InvalidUsageError, match="^tenant_id must be a non-empty string$"):
        BillingService(session=None, tenant_id="")  # type: ignore[arg-type]


def test_zero_is_a_valid_amount(session) -> None:
    record(session, amount=0)
    assert count(session) == 1


def test_batch_returns_ids_in_order_with_duplicates_resolved(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    existing = bs.record_usage(metric="tokens", amount=1, at=AT, idempotency_key="k0")
    events = [
        {"metric": "tokens", "amount": 1, "at": AT, "idempotency_key": "k0"},
        {"metric": "tokens", "amount": 2, "at": AT, "idempotency_key": "k1"},
        {"metric": "tokens", "amount": 2, "at": AT, "idempotency_key": "k1"},
        {"metric": "calls", "amount": 3, "at": AT, "idempotency_key": "k1", "metadata": {"a": 1}},
    ]
    ids = bs.record_usage_batch(events)
    assert ids[0] == existing
    assert ids[1] == ids[2]
    assert len(set(ids)) == 3
    assert count(session) == 3


def test_batch_of_thousands_is_stored_in_full(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    events = [
        {"metric": "tokens", "amount": i, "at": AT, "idempotency_key": f"k{i}"} for i in range(2500)
    ]
    ids = bs.record_usage_batch(events)
    assert len(set(ids)) == 2500
    total = session.execute(select(func.sum(UsageEvent.amount))).scalar_one()
    assert total == sum(range(2500))


def test_a_bad_event_in_a_batch_stores_nothing_and_names_its_index(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    events = [
        {"metric": "tokens", "amount": 1, "at": AT, "idempotency_key": "k1"},
        {"metric": "tokens", "amount": -1, "at": AT, "idempotency_key": "k2"},
    ]
    with pytest.raises(InvalidUsageError, match=r"events\[1\]") as caught:
        bs.record_usage_batch(events)
    assert caught.value.field == "events[1].amount"
    assert count(session) == 0


def test_a_batch_with_one_key_twice_for_different_amounts_conflicts(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    events = [
        {"metric": "tokens", "amount": 1, "at": AT, "idempotency_key": "k1"},
        {"metric": "tokens", "amount": 2, "at": AT, "idempotency_key": "k1"},
    ]
    with pytest.raises(IdempotencyConflictError) as caught:
        bs.record_usage_batch(events)
    assert str(caught.value) == (
        "idempotency key 'k1' for metric 'tokens' appears twice in the batch with different "
        "amounts or times"
    )
    assert count(session) == 0


def test_a_key_repeated_in_a_batch_of_new_events_is_a_duplicate_of_its_first(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    event = {"metric": "tokens", "amount": 1, "at": AT, "idempotency_key": "k1"}
    first, again = bs.ingest([event, dict(event)])
    assert (first.id, first.duplicate, again.duplicate) == (again.id, False, True)
    assert count(session) == 1


@pytest.mark.parametrize("size", [1, 3, 100])
def test_stored_events_are_created_at_the_time_of_their_store(session, monkeypatch, size) -> None:
    """One time for a whole batch, the ledger's clock's (a single event, an insert, a stage)."""
    stored_at = datetime(2025, 1, 20, 9, tzinfo=UTC)
    monkeypatch.setattr(ledger, "utcnow", lambda: stored_at)
    events = [
        {"metric": "tokens", "amount": 1, "at": AT, "idempotency_key": f"k{i}"} for i in range(size)
    ]
    BillingService(session=session, tenant_id="t1").record_usage_batch(events)
    created = session.execute(select(UsageEvent.created_at)).scalars().all()
    assert created == [stored_at] * size
