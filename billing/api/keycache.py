"""Authenticating a request's API key: one indexed lookup, or a per-process cache.

`KeyLookup()` reads the key's row on every request. `KeyLookup(marker=..., ttl=...)` keeps
what it read (the key's id, tenant and scopes, never the plaintext) for at most `ttl`, and
trusts a kept entry only while the revocation marker still holds the value it held before the
row was read. `billing keys revoke` sets the marker to a new random value after its commit, so
a key revoked from any process is refused on the next request of every process, as without
the cache. A random value rather than a counter: a marker lost (Redis flushed) and set again
can never come back to a value an entry was kept under.

When the marker cannot be read (Redis down), the row is read instead and nothing is kept: the
database stays the authority. Needs no FastAPI.

`afind` is `find` for an event loop: a marker that also reads asynchronously (`acurrent`, as
`RedisRevocationMarker` given an `async_client`) is awaited, so a request whose key is kept
costs no trip through the thread pool; the row, when it must be read, is read in a thread.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, cast, runtime_checkable

from anyio.to_thread import run_sync
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from sqlalchemy import Table, bindparam, select
from sqlalchemy.orm import Session

from billing.api.keys import hash_key, is_key_shaped
from billing.api.models import ApiKey

logger = logging.getLogger(__name__)

MAX_ENTRIES = 10_000

_keys = cast(Table, ApiKey.__table__)
# Built once, on the table (not the ORM entity): each request runs it with its digest bound,
# SQLAlchemy's compiled form cached, and no ORM work per execution.
_ACTIVE_BY_DIGEST = select(_keys.c.id, _keys.c.tenant_id, _keys.c.scopes).where(
    _keys.c.revoked_at.is_(None), _keys.c.key_hash == bindparam("digest")
)


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """An unrevoked key as a request needs it: its id, tenant (None: an operator's), scopes."""

    id: str
    tenant_id: str | None
    scopes: frozenset[str]


class RevocationMarker(Protocol):
    """A value every process can read, changed whenever a key is revoked."""

    def current(self) -> bytes | None:
        """The marker's value now (None: never set)."""

    def bump(self) -> None:
        """Give the marker a value it never had (after a revocation commits)."""


@runtime_checkable
class AsyncMarkerRead(Protocol):
    """A marker that can also be read without blocking the event loop."""

    async def acurrent(self) -> bytes | None:
        """The marker's value now (None: never set), awaited."""


class RedisRevocationMarker:
    """The marker as one Redis key, `{namespace}:api-keys:revoked`: a sync client, and an
    optional `async_client` on the same Redis for `acurrent` (reads from an event loop)."""

    def __init__(
        self, client: Redis, namespace: str = "billing", *, async_client: AsyncRedis | None = None
    ) -> None:
        self.client = client
        self.async_client = async_client
        self.name = f"{namespace}:api-keys:revoked"

    def current(self) -> bytes | None:
        return _as_bytes(self.client.get(self.name))

    async def acurrent(self) -> bytes | None:
        if self.async_client is None:
            return await run_sync(self.current)
        return _as_bytes(await self.async_client.get(self.name))

    def bump(self) -> None:
        self.client.set(self.name, secrets.token_hex(16))


def _as_bytes(value: object) -> bytes | None:
    return value if isinstance(value, bytes) or value is None else str(value).encode()


@dataclass(frozen=True, slots=True)
class _Entry:
    key: ActiveKey
    marker: bytes | None
    expires_at: float


@dataclass
class KeyLookup:
    """Finds the active key a bearer token names; caches only with a `marker` and a `ttl`."""

    marker: RevocationMarker | None = None
    ttl: timedelta = timedelta(0)
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, _Entry] = field(default_factory=dict, repr=False)

    def find(self, session: Session, plaintext: str) -> ActiveKey | None:
        """The unrevoked key whose plaintext this is, or None (unknown, revoked, malformed)."""
        if not is_key_shaped(plaintext):
            return None
        digest = hash_key(plaintext)
        if self.marker is None or self.ttl <= timedelta(0):
            return read_active_key(session, digest)
        try:
            marker = self.marker.current()
        except RedisError as error:
            logger.warning("API key cache bypassed, its marker is unreadable: %s", error)
            return read_active_key(session, digest)
        now = self.clock()
        kept = self._kept(digest, marker, now)
        if kept is not None:
            return kept
        key = read_active_key(session, digest)
        self._keep(digest, key, marker, now)
        return key

    async def afind(self, session: Session, plaintext: str) -> ActiveKey | None:
        """`find` from an event loop: no thread while a kept entry answers (with a marker
        that reads asynchronously); the row read in a thread. Same answers as `find`."""
        if not isinstance(self.marker, AsyncMarkerRead) or self.ttl <= timedelta(0):
            return await run_sync(self.find, session, plaintext)
        if not is_key_shaped(plaintext):
            return None
        digest = hash_key(plaintext)
        try:
            marker = await self.marker.acurrent()
        except RedisError as error:
            logger.warning("API key cache bypassed, its marker is unreadable: %s", error)
            return await run_sync(read_active_key, session, digest)
        now = self.clock()
        kept = self._kept(digest, marker, now)
        if kept is not None:
            return kept
        key = await run_sync(read_active_key, session, digest)
        self._keep(digest, key, marker, now)
        return key

    def _kept(self, digest: str, marker: bytes | None, now: float) -> ActiveKey | None:
        entry = self._entries.get(digest)
        if entry is not None and entry.marker == marker and entry.expires_at > now:
            return entry.key
        return None

    def _keep(self, digest: str, key: ActiveKey | None, marker: bytes | None, now: float) -> None:
        if key is None:
            self._entries.pop(digest, None)
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = _Entry(key, marker, now + self.ttl.total_seconds())


def read_active_key(session: Session, digest: str) -> ActiveKey | None:
    """The unrevoked key with this SHA-256 digest, from the database (one indexed SELECT)."""
    row = session.connection().execute(_ACTIVE_BY_DIGEST, {"digest": digest}).one_or_none()
    if row is None:
        return None
    return ActiveKey(id=row.id, tenant_id=row.tenant_id, scopes=frozenset(row.scopes))
