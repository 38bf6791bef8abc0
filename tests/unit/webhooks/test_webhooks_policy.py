"""The failure policy: backoff with jitter, Retry-After, dead after the last try, 410, streaks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhooks.policy import Outcome, RetryPolicy, failure_streak, parse_retry_after
from webhooks.settings import DEFAULT_RETRY_SCHEDULE, WebhookSettings, parse_schedule

NOW = datetime(2025, 1, 1, tzinfo=UTC)
SCHEDULE = parse_schedule("5s,5m,30m")


def policy(r: float = 0.5, **kw) -> RetryPolicy:
    return RetryPolicy(schedule=SCHEDULE, jitter=0.2, random=lambda: r, **kw)


def test_default_schedule_retries_for_over_three_days_even_with_short_jitter() -> None:
    schedule = WebhookSettings().retry_schedule
    assert schedule == parse_schedule(DEFAULT_RETRY_SCHEDULE)
    assert len(schedule) + 1 == 10
    assert sum(schedule, timedelta()) * 0.8 > timedelta(days=3)
    assert WebhookSettings().max_attempts == 10


@given(r=st.floats(min_value=0, max_value=1), attempt=st.integers(min_value=1, max_value=3))
def test_delays_follow_the_schedule_within_twenty_percent(r: float, attempt: int) -> None:
    delay = policy(r).delay_after(attempt)
    assert delay is not None
    base = SCHEDULE[attempt - 1]
    assert base * 0.8 - timedelta(microseconds=1) <= delay <= base * 1.2 + timedelta(microseconds=1)


def test_jitter_spreads_both_ways() -> None:
    assert policy(0.0).delay_after(1) == timedelta(seconds=4)
    assert policy(1.0).delay_after(1) == timedelta(seconds=6)


def test_a_failure_is_retried_at_the_scheduled_time() -> None:
    decision = policy().decide(1, Outcome(status_code=500, error="HTTP 500: boom"), NOW)
    assert (decision.status, decision.next_attempt_at) == ("failed", NOW + timedelta(seconds=5))
    assert (decision.last_status_code, decision.last_error) == (500, "HTTP 500: boom")


def test_after_the_last_attempt_the_delivery_is_dead() -> None:
    p = policy()
    assert p.max_attempts == 4
    assert p.decide(3, Outcome(error="timeout"), NOW).status == "failed"
    last = p.decide(4, Outcome(error="timeout"), NOW)
    assert (last.status, last.next_attempt_at, last.last_error) == ("dead", None, "timeout")


def test_2xx_is_delivered() -> None:
    decision = policy().decide(2, Outcome(status_code=202), NOW)
    assert (decision.status, decision.delivered_at, decision.last_error) == ("delivered", NOW, None)


def test_410_is_dead_at_once() -> None:
    decision = policy().decide(1, Outcome(status_code=410), NOW)
    assert decision.status == "dead"
    assert "gone" in (decision.last_error or "")


def test_a_refused_destination_is_dead_at_once_not_retried_for_days() -> None:
    error = "destination not allowed: set WEBHOOKS_ALLOW_LOOPBACK=true to allow it"
    decision = policy().decide(1, Outcome(error=error, refused=True), NOW)
    assert (decision.status, decision.next_attempt_at, decision.last_error) == ("dead", None, error)


def test_retry_after_is_honoured_when_longer_than_the_schedule() -> None:
    outcome = Outcome(status_code=429, retry_after=timedelta(minutes=10))
    assert policy().decide(1, outcome, NOW).next_attempt_at == NOW + timedelta(minutes=10)


def test_retry_after_never_makes_a_retry_sooner() -> None:
    outcome = Outcome(status_code=503, retry_after=timedelta(seconds=1))
    assert policy().decide(2, outcome, NOW).next_attempt_at == NOW + timedelta(minutes=5)


def test_retry_after_is_capped() -> None:
    outcome = Outcome(status_code=429, retry_after=timedelta(days=30))
    decision = policy(retry_after_max=timedelta(hours=1)).decide(1, outcome, NOW)
    assert decision.next_attempt_at == NOW + timedelta(hours=1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", timedelta(seconds=120)),
        ("Wed, 01 Jan 2025 00:02:00 GMT", timedelta(minutes=2)),
        ("Tue, 31 Dec 2024 00:00:00 GMT", timedelta(0)),
        ("soon", None),
        ("²", None),  # a digit to `isdigit`, not to `int`
        ("86399999999999", timedelta.max - timedelta(microseconds=999999)),
        ("86400000000000", timedelta.max - timedelta(microseconds=999999)),
        ("9" * 5000, timedelta.max - timedelta(microseconds=999999)),  # past `int`'s 4,300 digits
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_forms(value, expected) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_a_success_ends_a_failure_streak() -> None:
    assert (
        failure_streak(NOW, Outcome(status_code=200), NOW, timedelta(days=5)).failing_since is None
    )


def test_a_failure_starts_a_streak_and_keeps_its_start() -> None:
    first = failure_streak(None, Outcome(status_code=500), NOW, timedelta(days=5))
    assert (first.failing_since, first.disable_reason) == (NOW, None)
    later = failure_streak(
        NOW, Outcome(status_code=500), NOW + timedelta(days=1), timedelta(days=5)
    )
    assert later.failing_since == NOW


def test_five_days_of_failures_disable_and_say_why() -> None:
    streak = failure_streak(
        NOW, Outcome(status_code=502, error="HTTP 502"), NOW + timedelta(days=5), timedelta(days=5)
    )
    assert streak.disable_reason is not None
    assert "failed since 2025-01-01" in streak.disable_reason
    assert "HTTP 502" in streak.disable_reason


def test_gone_disables_at_once() -> None:
    streak = failure_streak(None, Outcome(status_code=410), NOW, timedelta(days=5))
    assert streak.disable_reason is not None
    assert "410" in streak.disable_reason


@pytest.mark.parametrize("text", ["5x", "", "1,,2", "-1s"])
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="retry delay"):
        parse_schedule(text)


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("WEBHOOKS_RETRY_SCHEDULE", "100ms, 1s,2m")
    monkeypatch.setenv("WEBHOOKS_SECRET_GRACE", "1h")
    monkeypatch.setenv("WEBHOOKS_ALLOW_LOOPBACK", "true")
    settings = WebhookSettings()
    assert settings.database_url == "postgresql://db/x"
    assert settings.retry_schedule == (
        timedelta(milliseconds=100),
        timedelta(seconds=1),
        timedelta(minutes=2),
    )
    assert settings.secret_grace == timedelta(hours=1)
    assert settings.allow_loopback is True


@pytest.mark.parametrize("value", ["3600", "1h", "60m", "PT1H"])
def test_durations_accept_seconds_units_and_iso_8601(value: str) -> None:
    assert WebhookSettings(secret_grace=value).secret_grace == timedelta(hours=1)
