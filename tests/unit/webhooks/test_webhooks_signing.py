"""Our signatures verify with the public `standardwebhooks` package, and theirs with `verify`."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from webhooks import WebhookVerificationError, verify
from webhooks.delivery import ClaimedDelivery, Sender, event_body
from webhooks.secrets import active_secrets, generate_secret
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


@pytest.mark.parametrize("secret", ["sekrit", "whsec_" + "A" * 43, generate_secret()])
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
    sender = Sender(httpx.Client(transport=httpx.MockTransport(handler)), user_agent="ua/1")
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
