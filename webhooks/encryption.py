"""Subscription secrets encrypted at rest: `WEBHOOKS_SECRET_KEY`, Fernet keys, rotatable.

With `WEBHOOKS_SECRET_KEY` set (one or more comma-separated Fernet keys, as
`cryptography.fernet.Fernet.generate_key()` makes them), a subscription's secrets are stored as
`fernet:<token>`, encrypted with the first key; any of the keys decrypts (`MultiFernet`). To
rotate: put the new key first, keep the old one after it, run `billing webhooks encrypt-secrets`
(which also encrypts rows stored before a key was set), then drop the old key. Rows stored
without a key stay readable as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session

from webhooks.errors import SecretKeyError
from webhooks.models import WebhookSubscription

PREFIX = "fernet:"


class SecretBox:
    """Encrypts and decrypts stored secrets with a list of Fernet keys (the first encrypts)."""

    def __init__(self, keys: Sequence[str]) -> None:
        """Raises:
        SecretKeyError: no key, or a key that is not 32 url-safe base64-encoded bytes.
        """
        try:
            self._fernet = MultiFernet([Fernet(key.strip()) for key in keys])
        except (ValueError, TypeError) as error:
            raise SecretKeyError(
                "WEBHOOKS_SECRET_KEY must be comma-separated Fernet keys"
                " (32 url-safe base64-encoded bytes each)"
            ) from error

    @classmethod
    def from_setting(cls, value: str | None) -> SecretBox | None:
        """The box for a `WEBHOOKS_SECRET_KEY` value; None when it is unset or empty."""
        if not value or not value.strip():
            return None
        return cls(value.split(","))

    def seal(self, secret: str) -> str:
        """The stored form of `secret`: `fernet:` and a token made with the first key."""
        return PREFIX + self._fernet.encrypt(secret.encode()).decode("ascii")

    def open(self, stored: str) -> str:
        """The secret a stored value holds (a value stored without a key is returned as is).

        Raises:
            SecretKeyError: no key decrypts it.
        """
        if not stored.startswith(PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored.removeprefix(PREFIX).encode()).decode()
        except InvalidToken as error:
            raise SecretKeyError(
                "no key of WEBHOOKS_SECRET_KEY decrypts a stored secret"
            ) from error

    def reseal(self, stored: str) -> str:
        """`stored` encrypted with the first key, whatever it was stored with (or without)."""
        return self.seal(self.open(stored))


def seal(secret: str, box: SecretBox | None) -> str:
    """The form of `secret` to store: encrypted with `box`, or as it is without one."""
    return box.seal(secret) if box else secret


def reveal(stored: str, box: SecretBox | None) -> str:
    """The secret in a stored value.

    Raises:
        SecretKeyError: it is encrypted and `box` is None or cannot decrypt it.
    """
    if box is not None:
        return box.open(stored)
    if stored.startswith(PREFIX):
        raise SecretKeyError("a stored secret is encrypted: set WEBHOOKS_SECRET_KEY")
    return stored


def encrypt_all(session: Session, box: SecretBox) -> int:
    """Encrypt every subscription's secrets with the first key of `box` (plain ones too);
    return how many subscriptions were rewritten. Does not commit."""
    count = 0
    for sub in session.scalars(select(WebhookSubscription).with_for_update()):
        sub.secret = box.reseal(sub.secret)
        if sub.previous_secret:
            sub.previous_secret = box.reseal(sub.previous_secret)
        count += 1
    session.flush()
    return count
