"""The one rule for "a subscription is active in a period", used by invoicing and the fan-out:
as an SQL condition (`subscription_active_in`) and on values already read
(`subscription_overlaps`).

A period is `[start, end)` and a subscription covers `[effective_at, ended_at)` (open-ended
when `ended_at` is null). They overlap when the subscription begins before the period ends and
ends after the period begins: one that begins exactly at `end`, or ends exactly at `start`,
bills nothing in the period.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BindParameter, ColumnElement, and_, or_

from billing.models import Subscription


def subscription_active_in(
    start: datetime | BindParameter[datetime], end: datetime | BindParameter[datetime]
) -> ColumnElement[bool]:
    """SQL condition: the subscription overlaps `[start, end)` (instants, or parameters of a
    statement built once)."""
    return and_(
        Subscription.effective_at < end,
        or_(Subscription.ended_at.is_(None), Subscription.ended_at > start),
    )


def subscription_overlaps(
    effective_at: datetime, ended_at: datetime | None, start: datetime, end: datetime
) -> bool:
    """`subscription_active_in` on values: `[effective_at, ended_at)` overlaps `[start, end)`."""
    return effective_at < end and (ended_at is None or ended_at > start)
