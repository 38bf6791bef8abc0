"""API keys: created once, shown once, stored as a SHA-256 digest, bound to one tenant or none.

A tenant's key holds `billing.read` and/or `billing.write` for that tenant; an operator's key
(no tenant) holds `billing.admin` and nothing else. No key is both: `billing.admin` changes what
every tenant is billed, so a tenant never holds it (migration 0007 took it from older keys).

A key reads `bk_` followed by 43 URL-safe characters (256 random bits). That much entropy
makes a fast, unsalted digest safe to store and lets a request be authenticated with one
indexed lookup; the first 11 characters are kept in clear (`prefix`) so people can tell their
keys apart. Needs no FastAPI.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import ledger
from billing.api.models import ApiKey
from billing.errors import InvalidUsageError
from webhooks.sqltypes import utcnow

ADMIN_SCOPE = "billing.admin"
SCOPES = ("billing.read", "billing.write", ADMIN_SCOPE)
TENANT_SCOPES = ("billing.read", "billing.write")
OPERATOR_SCOPES = (ADMIN_SCOPE,)
KEY_PREFIX = "bk_"
PREFIX_LENGTH = len(KEY_PREFIX) + 8
MAX_KEY_LENGTH = 200


def hash_key(plaintext: str) -> str:
    """The stored form of a key: its SHA-256, hex."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_key(
    session: Session,
    *,
    scopes: Iterable[str],
    tenant_id: str | None = None,
    operator: bool = False,
    name: str | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key for `tenant_id`, or an operator's key (`operator=True`, no tenant);
    return the row and the plaintext (never stored).

    Raises:
        InvalidUsageError: both or neither of a tenant and `operator`, a malformed tenant id,
            no scope, or a scope that kind of key cannot hold (`billing.admin` is for operators
            only, and operators hold nothing else).
    """
    if operator == (tenant_id is not None):
        raise InvalidUsageError("a key is either a tenant's or an operator's", field="tenant_id")
    if tenant_id is not None:
        tenant_id = ledger.validate_tenant(tenant_id)
    allowed = OPERATOR_SCOPES if operator else TENANT_SCOPES
    wanted = sorted(set(scopes))
    if not wanted or any(scope not in allowed for scope in wanted):
        kind = "an operator key" if operator else "a tenant key"
        raise InvalidUsageError(
            f"{kind} holds some of {', '.join(allowed)}; got {', '.join(wanted) or 'none'}",
            field="scopes",
        )
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant_id,
        name=name,
        prefix=plaintext[:PREFIX_LENGTH],
        key_hash=hash_key(plaintext),
        scopes=wanted,
    )
    session.add(key)
    session.flush()
    return key, plaintext


def is_key_shaped(plaintext: str) -> bool:
    """Whether `plaintext` could be one of our keys (prefix, length): worth a lookup."""
    return plaintext.startswith(KEY_PREFIX) and len(plaintext) <= MAX_KEY_LENGTH


def find_active_key(session: Session, plaintext: str) -> ApiKey | None:
    """The unrevoked key whose plaintext this is, or None."""
    if not is_key_shaped(plaintext):
        return None
    return session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()


def revoke_key(session: Session, key_id: str, *, now: datetime | None = None) -> ApiKey | None:
    """Revoke the key with id `key_id` (again: no change); None when there is no such key."""
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = now or utcnow()
        session.flush()
    return key


def list_keys(session: Session, tenant_id: str | None = None) -> list[ApiKey]:
    """Keys (revoked ones too), oldest first, of one tenant or of all."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.execute(query).scalars())
