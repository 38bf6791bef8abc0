"""Signing and verifying deliveries as the Standard Webhooks specification describes.

A delivery carries `webhook-id` (the event id, the same on every retry), `webhook-timestamp`
(unix seconds of the attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256>` of
`"{id}.{timestamp}.{body}"`, several separated by spaces while a secret rotates. Secrets read as the
`standardwebhooks` package reads them: `whsec_` followed by base64 (the prefix is optional).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from webhooks.errors import InvalidSubscriptionError, WebhookVerificationError

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = timedelta(minutes=5)
#: Unix seconds up to the year 33658; a longer header is refused before `int()` (which takes
#: 4,300 digits at most) and the float arithmetic of the tolerance (which overflows before).
MAX_TIMESTAMP_DIGITS = 12


@lru_cache(maxsize=1024)
def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (the prefix is optional, padding may be left out).

    Raises:
        InvalidSubscriptionError: the secret is empty or not strict base64.
    """
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        # Strict: a character outside the alphabet is an error, not skipped.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidSubscriptionError("webhook secret is not base64") from error
    if not key:
        raise InvalidSubscriptionError("webhook secret may not be empty")
    return key


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `body` sent as event `event_id` at `timestamp`."""
    digest = hmac.new(
        secret_key(secret), _signed_content(event_id, timestamp, body), hashlib.sha256
    )
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest.digest()).decode('ascii')}"


def signature_headers(
    secrets: Iterable[str], event_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers, with one signature per secret."""
    signatures = " ".join(sign(secret, event_id, timestamp, body) for secret in secrets)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret_or_secrets: str | Iterable[str],
    *,
    tolerance: timedelta = DEFAULT_TOLERANCE,
    now: Callable[[], datetime] | None = None,
) -> Any:
    """Check a received delivery and return its parsed JSON body.

    `headers` may be any mapping (a Starlette `Headers`, a dict); names are matched without
    regard to case. Any of several secrets (old and new while one rotates) may match any of the
    signatures. Signatures are compared in constant time.

    Raises:
        WebhookVerificationError: a header is missing or malformed, no signature matches, the
            timestamp is further than `tolerance` from now, or the body is not JSON.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    event_id = lowered.get("webhook-id")
    timestamp_header = lowered.get("webhook-timestamp")
    signature_header = lowered.get("webhook-signature")
    if not (event_id and timestamp_header and signature_header):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    timestamp = _check_timestamp(timestamp_header, tolerance, (now or _utcnow)())
    secrets = [secret_or_secrets] if isinstance(secret_or_secrets, str) else list(secret_or_secrets)
    if not secrets:
        raise WebhookVerificationError("no secret to verify with")
    content = _signed_content(event_id, timestamp, body)
    expected = [hmac.new(_verifying_key(s), content, hashlib.sha256).digest() for s in secrets]
    matched = False
    for candidate in _v1_signatures(signature_header):
        for digest in expected:
            # Keep comparing after a match so timing does not reveal which one matched.
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise WebhookVerificationError("no matching signature")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise WebhookVerificationError("body is not JSON") from error


def _signed_content(event_id: str, timestamp: int, body: bytes) -> bytes:
    return b"%s.%d.%s" % (event_id.encode(), timestamp, body)


def _verifying_key(secret: str) -> bytes:
    try:
        return secret_key(secret)
    except InvalidSubscriptionError as error:
        raise WebhookVerificationError(str(error)) from error


def _check_timestamp(header: str, tolerance: timedelta, now: datetime) -> int:
    # ASCII digits only: `int()` also takes signs, spaces, underscores and non-ASCII digits.
    digits = header.isascii() and header.isdigit()
    if not digits or len(header) > MAX_TIMESTAMP_DIGITS:
        raise WebhookVerificationError("webhook-timestamp is not unix seconds")
    timestamp = int(header)
    skew = abs(now.timestamp() - timestamp)
    if skew > tolerance.total_seconds():
        raise WebhookVerificationError("webhook-timestamp outside the tolerance")
    return timestamp


def _v1_signatures(header: str) -> list[bytes]:
    signatures = []
    for versioned in header.split(" "):
        version, _, encoded = versioned.partition(",")
        if version != SIGNATURE_VERSION or not encoded:
            continue
        try:
            signatures.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return signatures


def _utcnow() -> datetime:
    return datetime.now(UTC)
