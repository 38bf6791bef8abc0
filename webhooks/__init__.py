"""Webhooks: a transactional outbox, a relay that delivers signed events, and the receiver's side.

Publish inside the transaction of the change being announced::

    from webhooks import publish

    with session_factory.begin() as session:
        ...  # the change itself
        publish(session, "billing.invoice.created", {"tenant_id": "t1", ...}, event_id=stable_id)

`python -m webhooks.relay` delivers each event to every subscription of its topic, signed as the
Standard Webhooks specification says, with the body `{"type": topic, "timestamp": ISO 8601,
"data": payload}`. Receivers check a delivery with `verify(body, headers, secret)`.
"""

from __future__ import annotations

from webhooks.errors import WebhookError, WebhookVerificationError
from webhooks.memory import InMemoryOutboxStore
from webhooks.outbox import publish
from webhooks.service import WebhookService
from webhooks.signing import verify
from webhooks.subscriptions import InMemoryWebhookSubscriptions

__all__ = [
    "InMemoryOutboxStore",
    "InMemoryWebhookSubscriptions",
    "WebhookError",
    "WebhookService",
    "WebhookVerificationError",
    "publish",
    "verify",
]
