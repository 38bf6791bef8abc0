"""What happens to a delivery after an attempt: the failure policy of the relay.

- A 2xx answer: `delivered`.
- 410 Gone: the delivery is `dead` and its subscription is disabled (the endpoint asked us to stop).
- An address the SSRF guard refuses: `dead` at once, its error naming the setting that would
  allow it (retrying for days would change nothing; `billing webhooks replay` sends it again
  once the setting or the DNS answer changed).
- Anything else (3xx, as no redirect is followed; 4xx; 5xx; a timeout; a connection error):
  `failed`, retried after the next delay of the schedule, each
  delay jittered by ±`jitter`, and never sooner than a `Retry-After` on 429 or 503 asks (capped
  at `retry_after_max`). After the last scheduled delay has been used, the delivery is `dead`.
- A subscription whose attempts have all failed for `disable_after` is disabled (the store
  applies this, as it knows when the failures began).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from webhooks.models import DEAD, DELIVERED, FAILED

RETRY_AFTER_STATUSES = frozenset({429, 503})
GONE = 410


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or an error text when no answer came.

    `refused` says the SSRF guard kept the request from leaving (no connection was made).
    """

    status_code: int | None = None
    error: str | None = None
    retry_after: timedelta | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        """The subscriber answered 2xx."""
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        """The subscriber answered 410 Gone: stop sending to it."""
        return self.status_code == GONE


@dataclass(frozen=True)
class Decision:
    """The new state of a delivery row after an attempt."""

    status: str
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff schedule with jitter; `schedule[i]` is the delay after the (i+1)-th attempt."""

    schedule: tuple[timedelta, ...]
    jitter: float = 0.2
    retry_after_max: timedelta = timedelta(days=1)
    random: Callable[[], float] = field(default=random.random, compare=False)

    @property
    def max_attempts(self) -> int:
        """Attempts in all: the first one plus one per delay."""
        return len(self.schedule) + 1

    def delay_after(self, attempt: int, retry_after: timedelta | None = None) -> timedelta | None:
        """How long to wait after failed attempt number `attempt` (1-based); None: give up."""
        if attempt < 1 or attempt > len(self.schedule):
            return None
        factor = 1 + self.jitter * (2 * self.random() - 1)
        delay = self.schedule[attempt - 1] * factor
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay

    def decide(self, attempt: int, outcome: Outcome, now: datetime) -> Decision:
        """The delivery's state after attempt number `attempt` ended with `outcome` at `now`."""
        if outcome.delivered:
            return Decision(DELIVERED, None, now, outcome.status_code, None)
        error = outcome.error or f"HTTP {outcome.status_code}"
        if outcome.gone:
            return Decision(DEAD, None, None, outcome.status_code, f"{error}: endpoint is gone")
        if outcome.refused:
            return Decision(DEAD, None, None, None, error)
        delay = self.delay_after(attempt, outcome.retry_after)
        if delay is None:
            return Decision(DEAD, None, None, outcome.status_code, error)
        return Decision(FAILED, now + delay, None, outcome.status_code, error)


#: The most whole seconds a `timedelta` holds.
_MOST_SECONDS = timedelta.max.days * 86_400 + timedelta.max.seconds


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """A `Retry-After` header (seconds or an HTTP date) as a delay from `now`; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # `isdigit` alone takes "²", which `int` refuses
        # Longer than a timedelta holds is as long as any: `retry_after_max` caps it anyway.
        seconds = int(value) if len(value) <= len(str(_MOST_SECONDS)) else _MOST_SECONDS
        return timedelta(seconds=min(seconds, _MOST_SECONDS))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when - now, timedelta(0))


@dataclass(frozen=True)
class Streak:
    """A subscription's failure streak after an attempt, and why to disable it, if so."""

    failing_since: datetime | None
    disable_reason: str | None


def failure_streak(
    failing_since: datetime | None, outcome: Outcome, now: datetime, disable_after: timedelta
) -> Streak:
    """Update a subscription's streak: a success ends it, a failure starts or extends it.

    A 410 Gone disables at once; a streak older than `disable_after` disables too.
    """
    if outcome.delivered:
        return Streak(None, None)
    since = failing_since or now
    if outcome.gone:
        return Streak(since, f"endpoint answered 410 Gone at {now.isoformat()}")
    if now - since >= disable_after:
        return Streak(
            since,
            f"every delivery failed since {since.isoformat()} "
            f"(last error: {outcome.error or outcome.status_code})",
        )
    return Streak(since, None)
