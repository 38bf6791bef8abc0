"""webhooks: secrets as text, encrypted when WEBHOOKS_SECRET_KEY is set

Revision ID: 0010_webhooks_secrets_encrypted
Revises: 0009_webhooks_claimed_until

An encrypted secret (`fernet:` and a Fernet token) is longer than the 255 characters the columns
allowed, so they become `TEXT`. With `WEBHOOKS_SECRET_KEY` set when this runs, every stored
secret is encrypted with its first key; without it nothing is encrypted, and `billing webhooks
encrypt-secrets` does it later. Downgrading decrypts them (the key must be set).
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

from webhooks.encryption import SecretBox, encrypt_all, reveal
from webhooks.models import WebhookSubscription

revision = "0010_webhooks_secrets_encrypted"
down_revision = "0009_webhooks_claimed_until"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_subscriptions") as batch:
        batch.alter_column("secret", type_=sa.Text(), existing_nullable=False)
        batch.alter_column("previous_secret", type_=sa.Text(), existing_nullable=True)
    box = SecretBox.from_setting(os.environ.get("WEBHOOKS_SECRET_KEY"))
    if box is not None:
        encrypt_all(Session(bind=op.get_bind()), box)


def downgrade() -> None:
    box = SecretBox.from_setting(os.environ.get("WEBHOOKS_SECRET_KEY"))
    session = Session(bind=op.get_bind())
    for sub in session.query(WebhookSubscription):
        sub.secret = reveal(sub.secret, box)
        if sub.previous_secret:
            sub.previous_secret = reveal(sub.previous_secret, box)
    session.flush()
    with op.batch_alter_table("webhook_subscriptions") as batch:
        batch.alter_column("secret", type_=sa.String(255), existing_nullable=False)
        batch.alter_column("previous_secret", type_=sa.String(255), existing_nullable=True)
