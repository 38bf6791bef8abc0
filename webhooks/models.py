"""The webhook tables: subscriptions, the outbox of events, and one delivery row per pair.

`webhook_events` is the transactional outbox: a row is written in the same transaction as the
change it announces and kept even when nobody subscribes (a later subscriber gets it by replay).
`webhook_deliveries` tracks each (event, subscription) pair through
`pending → delivered | failed → … → dead`; the relay claims the due ones.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from webhooks.sqltypes import NAMING_CONVENTION, UTCDateTime, new_id, utcnow

#: Delivery statuses. `pending`: not tried yet (or replayed); `failed`: tried, will retry at
#: `next_attempt_at`; `delivered`: a 2xx answer; `dead`: no attempt left (or the endpoint is gone).
PENDING, DELIVERED, FAILED, DEAD = "pending", "delivered", "failed", "dead"
STATUSES = (PENDING, DELIVERED, FAILED, DEAD)

#: Longest event id a caller may give (a stable id such as `usage:t1:tokens:2025-01-01`).
EVENT_ID_MAX = 255


class Base(DeclarativeBase):
    """Declarative base of the webhook tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class WebhookSubscription(Base):
    """An endpoint that receives one topic's events, optionally only one tenant's.

    While a secret rotates, `previous_secret` stays valid until `previous_secret_expires_at`
    and deliveries carry a signature for each. `failing_since` is the time of the first failure
    since the last success; the relay disables the subscription when it gets too old.
    """

    __tablename__ = "webhook_subscriptions"
    __table_args__ = (Index("ix_webhook_subscriptions_topic_enabled", "topic", "enabled"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    topic: Mapped[str] = mapped_column(String(200), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    #: As `webhooks.encryption` stores them: `fernet:…` when `WEBHOOKS_SECRET_KEY` is set.
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    previous_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True
    )
    enabled: Mapped[bool] = mapped_column(
        Boolean, default=True, server_default=true(), nullable=False
    )
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False
    )


class WebhookEvent(Base):
    """One published event (the outbox row); `id` is the `webhook-id` every delivery carries."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(EVENT_ID_MAX), primary_key=True, default=new_id)
    topic: Mapped[str] = mapped_column(String(200), nullable=False)
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)


class WebhookDelivery(Base):
    """The state of sending one event to one subscription."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "subscription_id"),
        CheckConstraint("status IN ('pending', 'delivered', 'failed', 'dead')", name="status"),
        # Only the rows a relay may claim, in due order: a claim reads the head of this index
        # however many delivered or dead rows the table keeps.
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status IN ('pending', 'failed')"),
            sqlite_where=text("status IN ('pending', 'failed')"),
        ),
        Index("ix_webhook_deliveries_subscription_id", "subscription_id"),
        # One subscription's due rows in due order: feeding its chain (`extend`) reads only its
        # own, however many of the other subscriptions' fell due before.
        Index(
            "ix_webhook_deliveries_due_by_subscription",
            "subscription_id",
            "next_attempt_at",
            postgresql_where=text("status IN ('pending', 'failed')"),
            sqlite_where=text("status IN ('pending', 'failed')"),
        ),
        # Delivered deliveries by delivery time: what retention deletes, oldest first.
        Index(
            "ix_webhook_deliveries_delivered",
            "delivered_at",
            postgresql_where=text("status = 'delivered'"),
            sqlite_where=text("status = 'delivered'"),
        ),
        # Claimed deliveries only (those in flight, and the claims of relays that died): the
        # claim counts each subscription's deliveries in flight from it.
        Index(
            "ix_webhook_deliveries_claimed",
            "claimed_until",
            "subscription_id",
            postgresql_where=text("claimed_until IS NOT NULL"),
            sqlite_where=text("claimed_until IS NOT NULL"),
        ),
        # Dead deliveries only (few, unlike delivered ones): counted at each metrics scrape.
        Index(
            "ix_webhook_deliveries_dead",
            "created_at",
            postgresql_where=text("status = 'dead'"),
            sqlite_where=text("status = 'dead'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"), nullable=False)
    subscription_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_subscriptions.id"), nullable=False
    )
    status: Mapped[str] = mapped_column(String(16), default=PENDING, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: While a relay holds the delivery: the end of its claim's lease (None when not claimed).
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: The chain of one subscription's deliveries a relay claimed to send one after another
    #: (None: a slot of its own); the cap per subscription counts slots in flight.
    slot: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False
    )
