"""The webhooks error tree.

```
WebhookError
├── InvalidEventError            bad topic, event id or payload given to `publish` (permanent)
├── InvalidSubscriptionError     bad topic, URL or secret for a subscription (permanent)
│   └── DuplicateSubscriptionError   the tenant, topic and URL are subscribed already
├── SubscriptionNotFoundError    no subscription with that id (permanent)
├── EventNotFoundError           no event with that id (permanent)
├── DestinationNotAllowedError   a URL resolves to an address the SSRF guard refuses
├── SecretKeyError               WEBHOOKS_SECRET_KEY is malformed, missing or wrong (permanent)
└── WebhookVerificationError     a received delivery is not authentic (receiver side)
```

All of them are permanent: retrying the same call gives the same answer. Network failures while
delivering are not raised: the relay records them on the delivery row and retries later.
"""

from __future__ import annotations


class WebhookError(Exception):
    """Base of every error raised by the `webhooks` package."""


class InvalidEventError(WebhookError, ValueError):
    """`publish` was given a topic, event id or payload it cannot store; nothing was stored."""


class InvalidSubscriptionError(WebhookError, ValueError):
    """A subscription's topic, URL or secret is malformed; nothing was stored."""


class DuplicateSubscriptionError(InvalidSubscriptionError):
    """A subscription with the same tenant, topic and URL exists (`existing_id`): a second one
    would deliver every event twice, signed with different secrets; nothing was stored."""

    def __init__(self, existing_id: str) -> None:
        super().__init__(
            f"subscription {existing_id} already sends these events to this URL"
            " (enable or rotate it instead)"
        )
        self.existing_id = existing_id


class SubscriptionNotFoundError(WebhookError, LookupError):
    """No subscription has the given id."""


class EventNotFoundError(WebhookError, LookupError):
    """No event has the given id."""


class DestinationNotAllowedError(WebhookError):
    """The URL's host resolves to no address, or to one the SSRF guard refuses (the message
    names the setting that would allow it, if one would); permanent."""


class SecretKeyError(WebhookError):
    """`WEBHOOKS_SECRET_KEY` is malformed, or cannot decrypt a stored secret (it is unset or
    lacks the key the secret was encrypted with): a configuration error, permanent."""


class WebhookVerificationError(WebhookError):
    """A delivery failed verification: missing header, bad signature, stale timestamp, bad JSON."""


#: Errors a job should not retry.
PERMANENT_ERRORS: tuple[type[WebhookError], ...] = (
    InvalidEventError,
    InvalidSubscriptionError,
    DuplicateSubscriptionError,
    SubscriptionNotFoundError,
    EventNotFoundError,
)
