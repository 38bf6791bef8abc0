"""Subscriptions: add, list, disable, enable, rotate a secret; in memory or in SQL.

A subscription receives one topic's events, optionally only those of one tenant. Its secret is
generated (`whsec_` + 32 random bytes in base64) unless given. Rotating keeps the previous secret
valid for a grace period, during which deliveries carry a signature for each.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import Session

from webhooks.encryption import SecretBox, reveal, seal
from webhooks.errors import (
    DuplicateSubscriptionError,
    InvalidEventError,
    InvalidSubscriptionError,
    SubscriptionNotFoundError,
)
from webhooks.models import WebhookSubscription
from webhooks.secrets import check_secret, generate_secret
from webhooks.service import check_topic
from webhooks.sqltypes import new_id, utcnow
from webhooks.ssrf import never_allowed

DEFAULT_GRACE = timedelta(hours=24)
MAX_PORT = 65535


@dataclass
class Subscription:
    """An in-memory subscription (the SQL one is `webhooks.models.WebhookSubscription`)."""

    topic: str
    url: str
    secret: str
    tenant_id: str | None = None
    id: str = field(default_factory=new_id)
    enabled: bool = True
    previous_secret: str | None = None
    previous_secret_expires_at: datetime | None = None
    disabled_reason: str | None = None
    failing_since: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)


def check_subscription(topic: str, url: str, secret: str | None) -> str:
    """Validate a new subscription's fields; return its secret (generated when not given).

    Raises:
        InvalidSubscriptionError: bad topic, a URL that is not absolute http(s) or can never be
            delivered to (see `check_deliverable`), a bad secret.
    """
    try:
        check_topic(topic)
    except InvalidEventError as error:
        raise InvalidSubscriptionError(str(error)) from error
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise InvalidSubscriptionError(f"invalid URL {url!r}: {error}") from error
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidSubscriptionError(f"invalid URL {url!r}: an absolute http(s) URL is needed")
    check_deliverable(parsed)
    return generate_secret() if secret is None else check_secret(secret)


def check_deliverable(url: httpx.URL) -> None:
    """Refuse a URL no delivery could ever reach: credentials in it, port 0 or above 65535, a
    literal multicast, link-local or metadata address (the SSRF guard refuses those whatever the
    settings; other addresses are judged at each delivery, as DNS answers change).

    Raises:
        InvalidSubscriptionError: the URL can never be delivered to; the message says why.
    """
    if url.userinfo:
        raise InvalidSubscriptionError(
            "the URL may not carry credentials (user:password@): authenticate with the signature"
        )
    if url.port is not None and not 0 < url.port <= MAX_PORT:
        raise InvalidSubscriptionError(f"the URL's port {url.port} is not between 1 and 65535")
    try:
        address = ipaddress.ip_address(url.host.split("%")[0])
    except ValueError:
        return  # a host name: judged when it is resolved, at each delivery
    reason = never_allowed(address)
    if reason:
        raise InvalidSubscriptionError(f"the URL's host {address} is {reason}: never delivered")


class InMemoryWebhookSubscriptions:
    """Subscriptions kept in a dict (embedded use and tests); safe across threads."""

    def __init__(self, *, now: Callable[[], datetime] = utcnow) -> None:
        self._subs: dict[str, Subscription] = {}
        self._lock = threading.Lock()
        self._now = now

    def add(
        self, topic: str, url: str, secret: str | None = None, *, tenant_id: str | None = None
    ) -> Subscription:
        """Subscribe `url` to `topic`; the returned subscription holds the secret."""
        sub = Subscription(topic, url, check_subscription(topic, url, secret), tenant_id)
        with self._lock:
            for other in self._subs.values():
                if (other.tenant_id, other.topic, other.url) == (tenant_id, topic, url):
                    raise DuplicateSubscriptionError(other.id)
            self._subs[sub.id] = sub
        return sub

    def get(self, subscription_id: str) -> Subscription:
        """The subscription with this id.

        Raises:
            SubscriptionNotFoundError: there is none.
        """
        try:
            return self._subs[subscription_id]
        except KeyError:
            raise SubscriptionNotFoundError(subscription_id) from None

    def all(self) -> list[Subscription]:
        """Every subscription, oldest first."""
        return sorted(self._subs.values(), key=lambda s: s.created_at)

    def matching(self, topic: str, tenant_id: str | None) -> list[Subscription]:
        """Enabled subscriptions of `topic` whose tenant filter is empty or `tenant_id`."""
        return [
            s
            for s in self.all()
            if s.enabled and s.topic == topic and s.tenant_id in (None, tenant_id)
        ]

    def disable(self, subscription_id: str, reason: str = "disabled by an operator") -> None:
        """Stop deliveries to this subscription (its pending ones wait until it is enabled)."""
        sub = self.get(subscription_id)
        with self._lock:
            sub.enabled, sub.disabled_reason = False, reason

    def enable(self, subscription_id: str) -> None:
        """Resume deliveries to this subscription."""
        sub = self.get(subscription_id)
        with self._lock:
            sub.enabled, sub.disabled_reason, sub.failing_since = True, None, None

    def rotate_secret(
        self, subscription_id: str, *, grace: timedelta = DEFAULT_GRACE, secret: str | None = None
    ) -> str:
        """Replace the secret; the old one still signs for `grace`. Returns the new secret."""
        sub = self.get(subscription_id)
        new_secret = generate_secret() if secret is None else check_secret(secret)
        with self._lock:
            sub.previous_secret, sub.previous_secret_expires_at = sub.secret, self._now() + grace
            sub.secret = new_secret
        return new_secret


def matching_subscriptions(topic: str, tenant_id: str | None) -> Select[str]:
    """Ids of the enabled subscriptions that receive `topic` events of `tenant_id`."""
    return select(WebhookSubscription.id).where(subscription_matches(topic, tenant_id))


def subscription_matches(
    topic: str | ColumnElement[str], tenant_id: str | ColumnElement[str | None] | None
) -> ColumnElement[bool]:
    """The condition on `webhook_subscriptions` of `matching_subscriptions`: enabled, of
    `topic`, and with no tenant filter or `tenant_id`'s (values, or another table's columns)."""
    tenant_filter: ColumnElement[bool] = WebhookSubscription.tenant_id.is_(None)
    if tenant_id is not None:
        tenant_filter = or_(tenant_filter, WebhookSubscription.tenant_id == tenant_id)
    return and_(
        WebhookSubscription.topic == topic,
        WebhookSubscription.enabled.is_(True),
        tenant_filter,
    )


class SqlWebhookSubscriptions:
    """Subscriptions in the `webhook_subscriptions` table, through the caller's session.

    Like the billing services, it flushes but never commits: the caller owns the transaction.
    """

    def __init__(
        self,
        session: Session,
        *,
        now: Callable[[], datetime] = utcnow,
        box: SecretBox | None = None,
    ) -> None:
        self.session = session
        self._now = now
        self._box = box

    def add(
        self, topic: str, url: str, secret: str | None = None, *, tenant_id: str | None = None
    ) -> WebhookSubscription:
        """Subscribe `url` to `topic`; `secret_of` the returned row is its secret.

        Raises:
            InvalidSubscriptionError: a bad topic, URL or secret.
            DuplicateSubscriptionError: the tenant, topic and URL are subscribed already
                (enabled or not); its `existing_id` names that subscription.
        """
        checked = check_subscription(topic, url, secret)
        if self.session.get_bind().dialect.name == "postgresql":
            # Concurrent adds of one target take turns until commit, so the second sees the first.
            target = f"webhook-subscription:{tenant_id}:{topic}:{url}"
            self.session.execute(select(func.pg_advisory_xact_lock(func.hashtext(target))))
        existing = self.session.scalar(
            select(WebhookSubscription.id).where(
                WebhookSubscription.topic == topic,
                WebhookSubscription.url == url,
                WebhookSubscription.tenant_id.is_(None)
                if tenant_id is None
                else WebhookSubscription.tenant_id == tenant_id,
            )
        )
        if existing is not None:
            raise DuplicateSubscriptionError(existing)
        sub = WebhookSubscription(
            topic=topic,
            url=url,
            secret=seal(checked, self._box),
            tenant_id=tenant_id,
            enabled=True,
        )
        self.session.add(sub)
        self.session.flush()
        return sub

    def get(self, subscription_id: str) -> WebhookSubscription:
        """The subscription with this id.

        Raises:
            SubscriptionNotFoundError: there is none.
        """
        sub = self.session.get(WebhookSubscription, subscription_id)
        if sub is None:
            raise SubscriptionNotFoundError(subscription_id)
        return sub

    def all(self) -> list[WebhookSubscription]:
        """Every subscription, oldest first."""
        query = select(WebhookSubscription).order_by(
            WebhookSubscription.created_at, WebhookSubscription.id
        )
        return list(self.session.scalars(query))

    def matching(self, topic: str, tenant_id: str | None) -> list[WebhookSubscription]:
        """Enabled subscriptions of `topic` whose tenant filter is empty or `tenant_id`."""
        ids = matching_subscriptions(topic, tenant_id)
        query = select(WebhookSubscription).where(WebhookSubscription.id.in_(ids))
        order = (WebhookSubscription.created_at, WebhookSubscription.id)
        return list(self.session.scalars(query.order_by(*order)))

    def disable(self, subscription_id: str, reason: str = "disabled by an operator") -> None:
        """Stop deliveries to this subscription (its pending ones wait until it is enabled)."""
        sub = self.get(subscription_id)
        sub.enabled, sub.disabled_reason = False, reason
        self.session.flush()

    def enable(self, subscription_id: str) -> None:
        """Resume deliveries to this subscription."""
        sub = self.get(subscription_id)
        sub.enabled, sub.disabled_reason, sub.failing_since = True, None, None
        self.session.flush()

    def rotate_secret(
        self, subscription_id: str, *, grace: timedelta = DEFAULT_GRACE, secret: str | None = None
    ) -> str:
        """Replace the secret; the old one still signs for `grace`. Returns the new secret."""
        sub = self.get(subscription_id)
        new_secret = generate_secret() if secret is None else check_secret(secret)
        sub.previous_secret, sub.previous_secret_expires_at = sub.secret, self._now() + grace
        sub.secret = seal(new_secret, self._box)
        self.session.flush()
        return new_secret

    def secret_of(self, sub: WebhookSubscription) -> str:
        """The secret of a subscription (decrypted if stored encrypted).

        Raises:
            SecretKeyError: it is encrypted and the key is missing or wrong.
        """
        return reveal(sub.secret, self._box)
