"""Webhooks: a transactional outbox, a relay that delivers signed events, and the receiver's side.

Publish inside the transaction of the change being announced::

    from webhooks import publish

    with session_factory.begin() as session:
        ...  # the change itself
        publish(session, "billing.invoice.created", {"tenant_id": "t1", ...}, event_id=stable_id)

`python -m webhooks.relay` delivers the events; receivers check them with `webhooks.verify`.
"""

from __future__ import annotations

from webhooks.errors import WebhookError, WebhookVerificationError
from webhooks.outbox import publish

__all__ = ["WebhookError", "WebhookVerificationError", "publish"]
