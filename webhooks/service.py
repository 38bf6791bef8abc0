"""`WebhookService`: publish events to whatever outbox and subscription stores it is given.

```python
outbox = InMemoryOutboxStore()
subs = InMemoryWebhookSubscriptions()
subs.add("billing.usage_aggregated", url="https://example.test/hook", secret="sekrit")
webhooks = WebhookService(outbox=outbox, subs=subs)
webhooks.publish("billing.usage_aggregated", {"tenant_id": "t1", ...})
```

With SQL stores bound to the caller's session (`webhooks.publish(session, ...)` does exactly
that) the event commits with the caller's transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from webhooks.errors import InvalidEventError
from webhooks.interfaces import NewEvent, OutboxStore, SubscriptionStore
from webhooks.models import EVENT_ID_MAX
from webhooks.sqltypes import new_id, utcnow

TOPIC_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,199}")
_EVENT_ID = re.compile(rf"[\x21-\x7e]{{1,{EVENT_ID_MAX}}}")


class WebhookService:
    """Publishes events: one stored event, one pending delivery per matching subscription."""

    def __init__(
        self,
        *,
        outbox: OutboxStore,
        subs: SubscriptionStore,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.outbox = outbox
        self.subs = subs
        self._now = now

    def publish(
        self, topic: str, payload: Mapping[str, Any], *, event_id: str | None = None
    ) -> str:
        """Store an event for every enabled subscription of `topic`; return the event id.

        Subscriptions with a tenant filter get only events whose `payload["tenant_id"]` is that
        tenant. An event nobody subscribes to is kept (a later subscriber can be sent it by
        replay). A given `event_id` is stored once: publishing it again writes nothing.

        Raises:
            InvalidEventError: bad topic, event id or payload; nothing is stored.
        """
        event = new_event(topic, payload, event_id, self._now())
        self.outbox.append(event, self.subs.matching(event.topic, event.tenant_id))
        return event.id


def new_event(
    topic: str, payload: Mapping[str, Any], event_id: str | None, now: datetime
) -> NewEvent:
    """Validate what `publish` was given.

    Raises:
        InvalidEventError: the topic or event id is malformed, or the payload is not a JSON
            object (for instance holds a datetime or NaN).
    """
    check_topic(topic)
    body = _json_object(payload)
    tenant_id = body.get("tenant_id")
    return NewEvent(
        id=new_id() if event_id is None else check_event_id(event_id),
        topic=topic,
        tenant_id=tenant_id if isinstance(tenant_id, str) else None,
        payload=body,
        created_at=now,
    )


def check_topic(topic: str) -> str:
    """Return `topic` if it is a dotted name of letters, digits, `_ . : -` (at most 200).

    Raises:
        InvalidEventError: it is not.
    """
    if not isinstance(topic, str) or not TOPIC_PATTERN.fullmatch(topic):
        raise InvalidEventError(f"invalid topic {topic!r}: use letters, digits and . _ : -")
    return topic


def check_event_id(event_id: str) -> str:
    """Return `event_id` if it can travel as the `webhook-id` header (printable, no spaces).

    Raises:
        InvalidEventError: it cannot.
    """
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise InvalidEventError(
            f"invalid event id {event_id!r}: 1 to {EVENT_ID_MAX} printable ASCII characters"
        )
    return event_id


def _json_object(payload: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise InvalidEventError(f"payload must be a JSON object, got {type(payload).__name__}")
    try:
        parsed: dict[str, Any] = json.loads(json.dumps(dict(payload), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InvalidEventError(f"payload is not JSON-serialisable: {error}") from error
    return parsed
