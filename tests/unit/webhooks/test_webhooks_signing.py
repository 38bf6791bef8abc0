"""Our signatures verify with the public `standardwebhooks` package, and theirs with `verify`."""

from __future__ import annotations

import base64
import hmac
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from webhooks import WebhookVerificationError, signing, verify
from webhooks.delivery import ClaimedDelivery, DeliveryClient, Sender, event_body
from webhooks.errors import InvalidSubscriptionError
from webhooks.secrets import active_secrets, check_secret, generate_secret
from webhooks.signing import secret_key, sign, signature_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER = "whsec_c2VjcmV0LXRoYXQtaXMtbm90LXRoZS1yaWdodC1vbmU="
BODY = b'{"type":"billing.invoice.created","data":{"tenant_id":"t1"}}'
NOW = datetime.now(UTC)


def headers(secrets=(SECRET,), event_id="evt_1", at: datetime | None = None, body=BODY):
    return signature_headers(secrets, event_id, int((at or datetime.now(UTC)).timestamp()), body)


def test_our_signature_verifies_with_standardwebhooks() -> None:
    assert standardwebhooks.Webhook(SECRET).verify(BODY, headers()) == json.loads(BODY)


def test_standardwebhooks_signature_verifies_with_ours() -> None:
    now = datetime.now(UTC)
    signature = standardwebhooks.Webhook(SECRET).sign("evt_1", now, BODY.decode())
    received = {
        "Webhook-Id": "evt_1",
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": signature,
    }
    assert verify(BODY, received, SECRET) == json.loads(BODY)


def test_signature_matches_standardwebhooks_byte_for_byte() -> None:
    at = datetime(2025, 1, 1, tzinfo=UTC)
    theirs = standardwebhooks.Webhook(SECRET).sign("evt_1", at, BODY.decode())
    assert sign(SECRET, "evt_1", int(at.timestamp()), BODY) == theirs


@pytest.mark.parametrize(
    "secret",
    ["sekrit", "whsec_" + "A" * 43, generate_secret()],
    ids=["plain", "zeros", "generated"],
)
def test_secrets_are_read_as_standardwebhooks_reads_them(secret: str) -> None:
    assert standardwebhooks.Webhook(secret).verify(BODY, headers((secret,)))


def test_generated_secrets_are_whsec_and_at_least_24_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_")
    assert first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) >= 24
    assert secret_key(first) == base64.b64decode(first.removeprefix("whsec_"))


def test_rotation_signs_with_both_secrets_and_each_receiver_accepts() -> None:
    signed = headers((OTHER, SECRET))
    assert len(signed["webhook-signature"].split(" ")) == 2
    assert standardwebhooks.Webhook(SECRET).verify(BODY, signed)
    assert standardwebhooks.Webhook(OTHER).verify(BODY, signed)
    assert verify(BODY, signed, [OTHER])
    assert verify(BODY, signed, SECRET)


def test_the_previous_secret_signs_only_during_its_grace() -> None:
    later = NOW + timedelta(hours=24)
    assert active_secrets("new", "old", later, NOW) == ["new", "old"]
    assert active_secrets("new", "old", later, later) == ["new"]
    assert active_secrets("new", None, None, NOW) == ["new"]


def test_verify_accepts_any_of_several_secrets() -> None:
    assert verify(BODY, headers(), [OTHER, SECRET]) == json.loads(BODY)


def test_tampered_body_fails() -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(BODY.replace(b"t1", b"t2"), headers(), SECRET)


def test_wrong_secret_fails() -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(BODY, headers(), OTHER)


def test_changed_event_id_fails() -> None:
    signed = headers() | {"webhook-id": "evt_2"}
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(BODY, signed, SECRET)


def test_old_timestamp_fails() -> None:
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(BODY, headers(at=datetime.now(UTC) - timedelta(minutes=6)), SECRET)


def test_future_timestamp_fails() -> None:
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(BODY, headers(at=datetime.now(UTC) + timedelta(minutes=6)), SECRET)


def test_tolerance_is_a_parameter() -> None:
    old = headers(at=datetime.now(UTC) - timedelta(minutes=30))
    assert verify(BODY, old, SECRET, tolerance=timedelta(hours=1))


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_fails(missing: str) -> None:
    signed = headers()
    del signed[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(BODY, signed, SECRET)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("webhook-timestamp", "yesterday"),
        ("webhook-signature", "v1"),
        ("webhook-signature", "v1,not base64!"),
        ("webhook-signature", "v2," + base64.b64encode(b"x" * 32).decode()),
    ],
)
def test_malformed_headers_fail(name: str, value: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers() | {name: value}, SECRET)


def test_body_that_is_not_json_fails_even_when_signed() -> None:
    body = b"not json"
    with pytest.raises(WebhookVerificationError, match="JSON"):
        verify(body, headers(body=body), SECRET)


def test_no_secret_fails() -> None:
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers(), [])


@given(
    event_id=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
    data=st.dictionaries(st.text(), st.integers() | st.text() | st.booleans()),
    flip=st.integers(min_value=0),
)
def test_any_signed_body_verifies_and_any_changed_byte_does_not(event_id, data, flip) -> None:
    body = json.dumps(data).encode()
    signed = headers(event_id=event_id, body=body)
    assert verify(body, signed, SECRET) == data
    assert standardwebhooks.Webhook(SECRET).verify(body, signed) == data
    index = flip % len(body)
    tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
    with pytest.raises(WebhookVerificationError):
        verify(tampered, signed, SECRET)


def test_the_sent_body_is_exactly_the_signed_bytes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    delivery = ClaimedDelivery(
        delivery_id="d1",
        event_id="evt_1",
        topic="billing.usage_aggregated",
        payload={"tenant_id": "t1", "total": 42, "note": "ünïcode"},
        event_created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        subscription_id="s1",
        url="https://example.test/hook",
        secrets=(SECRET,),
        attempt=1,
    )
    sender = Sender(DeliveryClient(httpx.MockTransport(handler)), user_agent="ua/1")
    assert sender.send(delivery).delivered

    request = seen[0]
    assert request.content == event_body(
        delivery.topic, delivery.payload, delivery.event_created_at
    )
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "ua/1"
    assert request.headers["webhook-id"] == "evt_1"
    envelope = standardwebhooks.Webhook(SECRET).verify(request.content, dict(request.headers))
    assert envelope == {
        "type": "billing.usage_aggregated",
        "timestamp": "2025-01-02T03:04:05+00:00",
        "data": delivery.payload,
    }


FIXED = datetime(2025, 1, 1, tzinfo=UTC)


def at_fixed(**header_overrides: str) -> dict[str, str]:
    return headers(at=FIXED) | header_overrides


@pytest.mark.parametrize(
    "timestamp",
    [
        "+{}",
        " {}",
        "{} ",
        "{}\n",
    ],
)
def test_a_timestamp_other_than_ascii_digits_fails(timestamp: str) -> None:
    seconds = str(int(FIXED.timestamp()))
    signed = at_fixed(**{"webhook-timestamp": timestamp.format(seconds)})
    with pytest.raises(WebhookVerificationError, match="unix seconds"):
        verify(BODY, signed, SECRET, now=lambda: FIXED)


def test_a_timestamp_in_non_ascii_digits_fails() -> None:
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in str(int(FIXED.timestamp())))
    assert int(fullwidth) == int(FIXED.timestamp())
    with pytest.raises(WebhookVerificationError, match="unix seconds"):
        verify(BODY, at_fixed(**{"webhook-timestamp": fullwidth}), SECRET, now=lambda: FIXED)


@pytest.mark.parametrize("skew", [timedelta(minutes=5), -timedelta(minutes=5)])
def test_a_timestamp_exactly_at_the_tolerance_passes(skew: timedelta) -> None:
    assert verify(BODY, headers(at=FIXED), SECRET, now=lambda: FIXED + skew)


@pytest.mark.parametrize(
    "skew", [timedelta(minutes=5, seconds=1), -timedelta(minutes=5, seconds=1)]
)
def test_a_timestamp_one_second_past_the_tolerance_fails(skew: timedelta) -> None:
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(BODY, headers(at=FIXED), SECRET, now=lambda: FIXED + skew)


def test_a_correct_digest_under_another_version_fails() -> None:
    v1 = at_fixed()["webhook-signature"]
    v2 = "v2," + v1.removeprefix("v1,")
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(BODY, at_fixed(**{"webhook-signature": v2}), SECRET, now=lambda: FIXED)


def test_a_correct_digest_with_a_stray_character_fails() -> None:
    encoded = at_fixed()["webhook-signature"].removeprefix("v1,")
    stray = f"v1,{encoded[:10]}!{encoded[10:]}"
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(BODY, at_fixed(**{"webhook-signature": stray}), SECRET, now=lambda: FIXED)


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # `==` would leak, through timing, how many leading bytes of a forgery are right.
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    assert verify(BODY, at_fixed(), SECRET, now=lambda: FIXED)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, at_fixed(), OTHER, now=lambda: FIXED)
    assert len(compared) == 2


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_MfKQ9r8GKYqrTwjU PD8ILPZIo2LaLaSw",
        "whsec_MfKQ9r8GKYqrTwjU!PD8ILPZIo2LaLaSw",
        "whsec_MfKQ9r8GKYqrTwjU\nPD8ILPZIo2LaLaSw",
        "whsec_MfKQ9",
        "whsec_",
    ],
)
def test_a_secret_that_is_not_strict_base64_is_refused(secret: str) -> None:
    with pytest.raises(InvalidSubscriptionError):
        secret_key(secret)


@pytest.mark.parametrize("size", [1, 16, 23])
def test_a_subscription_secret_of_fewer_than_24_bytes_is_refused(size: int) -> None:
    short = "whsec_" + base64.b64encode(b"k" * size).decode()
    with pytest.raises(InvalidSubscriptionError, match="at least 24"):
        check_secret(short)


@pytest.mark.parametrize(
    "secret",
    [SECRET, SECRET.removeprefix("whsec_"), generate_secret()],
    ids=["whsec", "bare", "generated"],
)
def test_a_subscription_secret_of_24_bytes_or_more_is_accepted(secret: str) -> None:
    assert check_secret(secret) == secret
