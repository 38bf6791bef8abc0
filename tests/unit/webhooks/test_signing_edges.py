"""Verification details mutation testing found unchecked: each refusal's exact message, and a
bad or foreign signature in the list not hiding a good one after it."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from webhooks import WebhookVerificationError, verify
from webhooks.signing import sign, signature_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = b'{"type":"billing.invoice.created"}'
FIXED = datetime(2025, 1, 1, tzinfo=UTC)
SECONDS = int(FIXED.timestamp())
GOOD = sign(SECRET, "evt_1", SECONDS, BODY)


def signed(signature: str = GOOD, **overrides: str) -> dict[str, str]:
    return {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(SECONDS),
        "webhook-signature": signature,
        **overrides,
    }


def refusal(body: bytes, headers: dict[str, str], secrets: str | list[str] = SECRET) -> str:
    with pytest.raises(WebhookVerificationError) as refused:
        verify(body, headers, secrets, now=lambda: FIXED)
    return str(refused.value)


def test_each_refusal_says_exactly_why() -> None:
    assert refusal(BODY, {"webhook-id": "evt_1"}) == (
        "missing webhook-id, webhook-timestamp or webhook-signature"
    )
    assert refusal(BODY, signed(), []) == "no secret to verify with"
    assert refusal(BODY, signed(), "whsec_!!!!") == "webhook secret is not base64"
    assert refusal(b"{}", signed()) == "no matching signature"
    assert refusal(BODY, signed(**{"webhook-timestamp": "-1"})) == (
        "webhook-timestamp is not unix seconds"
    )
    assert refusal(BODY, signed(**{"webhook-timestamp": str(SECONDS - 301)})) == (
        "webhook-timestamp outside the tolerance"
    )
    not_json = b"not json"
    headers = signature_headers([SECRET], "evt_1", SECONDS, not_json)
    assert refusal(not_json, headers) == "body is not JSON"


@pytest.mark.parametrize("digits", [13, 400, 5000])
def test_a_timestamp_longer_than_12_digits_is_not_unix_seconds(digits: int) -> None:
    """Refused as the others are, where `int()` or the skew's float overflowed (a 500 from a
    receiver, to anyone without the secret)."""
    too_long = signed(**{"webhook-timestamp": "1" * digits})
    assert refusal(BODY, too_long) == "webhook-timestamp is not unix seconds"


def test_a_timestamp_of_12_digits_is_read_as_unix_seconds() -> None:
    twelve = signed(**{"webhook-timestamp": "9" * 12})
    assert refusal(BODY, twelve) == "webhook-timestamp outside the tolerance"


@pytest.mark.parametrize(
    "before",
    [
        "v2," + GOOD.removeprefix("v1,"),  # another version
        "v1,!!!!",  # not base64
        "v1,",  # empty
        "nonsense",
        "v1a," + base64.b64encode(b"x" * 32).decode(),
    ],
)
def test_a_good_signature_after_one_that_does_not_count_still_verifies(before: str) -> None:
    assert verify(BODY, signed(f"{before} {GOOD}"), SECRET, now=lambda: FIXED) == {
        "type": "billing.invoice.created"
    }


def test_signatures_are_separated_by_spaces_only() -> None:
    # Standard Webhooks delimits the list with spaces: a tab joins two entries into one malformed
    # entry (the good signature after the tab is not read on its own).
    tab_separated = signed(f"v1,{base64.b64encode(b'x' * 32).decode()}\t{GOOD}")
    assert refusal(BODY, tab_separated) == "no matching signature"
