"""`require_quota`: protect any route of the app with the caller's plan quota.

    @app.get("/reports", dependencies=[Depends(require_quota("reports", window="day"))])

The tenant is the request's principal (see `billing.api.auth`); an operator key, bound to no
tenant, gets 403. Responses carry
`RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds to the end of the UTC
window). Over a hard limit the answer is 429 problem+json with those headers and `Retry-After`;
over a soft limit the request goes through with a `Warning` header saying so. A tenant without
an active subscription, or whose plan has no entitlement for the key and window, is not limited
(and gets no RateLimit headers).

`consume=n` records n units of usage of metric `key` in the same transaction as the check,
with the window's counter locked, so concurrent requests cannot overshoot a hard limit. It is
committed before the route runs: usage is counted even if the route then fails.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import get_args

from fastapi import Response

from billing.api.auth import PrincipalDep, tenant_of
from billing.api.deps import ApiDep, SessionDep
from billing.api.problems import ProblemError
from billing.quotas import Group, QuotaStatus, Window, check_group, check_quota, consume_quota

_ADJECTIVE = {"day": "daily", "month": "monthly"}
SOFT_LIMIT_WARNING = '299 billing "soft quota exceeded: {key} {used}/{limit} per {window}"'


def require_quota(
    key: str,
    *,
    window: Window = "day",
    soft: bool = False,
    consume: int = 0,
    group: Group | None = None,
) -> Callable[..., QuotaStatus | None]:
    """A FastAPI dependency enforcing the tenant's `key` entitlement per `window`.

    It returns the `QuotaStatus` (None when unlimited), so a route may also take it as a
    parameter: `status: QuotaStatus | None = Depends(require_quota("reports"))`. With `group`
    (`{"model": "gpt-4"}`) it limits the usage of that group only, and consumed usage is
    recorded with those metadata values.

    Raises:
        ValueError: at definition time, for an unknown window, a negative `consume` or a
            malformed `group`.
    """
    if window not in get_args(Window):
        raise ValueError(f"window must be 'day' or 'month', not {window!r}")
    if isinstance(consume, bool) or not isinstance(consume, int) or consume < 0:
        raise ValueError("consume must be a non-negative integer")
    if not key or not isinstance(key, str):
        raise ValueError("key must be a non-empty string")
    if group is not None:
        group = dict(check_group(group))  # InvalidUsageError is a ValueError

    def quota(
        response: Response, principal: PrincipalDep, session: SessionDep, api: ApiDep
    ) -> QuotaStatus | None:
        now = api.clock()
        tenant_id = tenant_of(principal).tenant_id  # an operator has no quota: 403
        if consume:
            status = consume_quota(
                session,
                tenant_id=tenant_id,
                key=key,
                window=window,
                amount=consume,
                now=now,
                soft=soft,
                group=group,
            )
        else:
            status = check_quota(
                session, tenant_id=tenant_id, key=key, window=window, now=now, group=group
            )
        session.commit()  # the consumed usage, and releases the counter lock at once
        if status is None:
            return None
        headers = rate_limit_headers(status, now)
        if not status.allowed and not soft:
            raise ProblemError(
                429,
                "Quota exceeded",
                f"the {_ADJECTIVE[window]} quota of {key!r} ({status.limit}) is used up; "
                f"it resets at {status.reset_at.isoformat()}",
                slug="quota-exceeded",
                headers={**headers, "Retry-After": headers["RateLimit-Reset"]},
                key=key,
                window=window,
                limit=status.limit,
                used=status.used,
            )
        response.headers.update(headers)
        if not status.allowed:
            response.headers["Warning"] = SOFT_LIMIT_WARNING.format(
                key=key, used=status.used, limit=status.limit, window=window
            )
        return status

    quota.__name__ = f"require_quota_{window}"
    return quota


def rate_limit_headers(status: QuotaStatus, now: datetime) -> dict[str, str]:
    """`RateLimit-Limit`, `-Remaining` and `-Reset` (delta seconds) for `status`."""
    return {
        "RateLimit-Limit": str(status.limit),
        "RateLimit-Remaining": str(status.remaining),
        "RateLimit-Reset": str(status.seconds_to_reset(now)),
    }
