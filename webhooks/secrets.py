"""Subscription secrets: generation and rotation with a grace period.

After a rotation the old secret stays valid until its grace period ends; meanwhile every delivery
is signed with both, so a receiver can switch secrets at its own pace.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from webhooks.errors import InvalidSubscriptionError
from webhooks.signing import SECRET_PREFIX, secret_key

#: Random bytes in a generated secret (the Standard Webhooks minimum is 24).
SECRET_BYTES = 32
#: Fewest bytes a given secret may have (the Standard Webhooks minimum).
MIN_SECRET_BYTES = 24


def generate_secret() -> str:
    """A fresh `whsec_…` secret of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def check_secret(secret: str) -> str:
    """Return `secret` if it may sign a subscription's deliveries: strict base64, optionally
    `whsec_`-prefixed, of at least `MIN_SECRET_BYTES` bytes.

    Raises:
        InvalidSubscriptionError: it may not.
    """
    if len(secret_key(secret)) < MIN_SECRET_BYTES:
        raise InvalidSubscriptionError(
            f"webhook secret is too short: at least {MIN_SECRET_BYTES} random bytes are needed"
        )
    return secret


def active_secrets(
    secret: str,
    previous_secret: str | None,
    previous_expires_at: datetime | None,
    now: datetime,
) -> list[str]:
    """The secrets to sign with now: the current one, then the previous one during its grace."""
    if previous_secret and previous_expires_at is not None and now < previous_expires_at:
        return [secret, previous_secret]
    return [secret]
