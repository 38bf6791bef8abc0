"""Fire locks: each scheduled fire is enqueued by one scheduler, however many run.

A fire has a key naming the work it stands for (`aggregate-daily:2025-01-31`,
`monthly-invoices:2025-01`), so two schedulers, even with clocks a little apart, claim the same
key. `RedisFireLock` claims with `SET key owner NX PX lease`: one caller wins, the others see the
key and skip. While the fan-out runs its owner renews that short lease; when it is done, the key
becomes a `done` marker that outlives the fire (`FIRE_LOCK_TTL`), which is how a restarted
scheduler knows what it already enqueued. A scheduler that dies mid fan-out stops renewing, so its
lease runs out and another run (a retry, a restart's catch-up) claims the fire again.
`LocalFireLock` does the same inside one process, for the embedded `billing run`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta
from typing import Protocol

import redis


class FireLock(Protocol):
    """Claims fire keys; exactly one claim of a key succeeds until it expires or is released."""

    def claim(self, key: str, ttl: timedelta) -> bool:
        """True if this caller now owns `key`; False if someone claimed it already."""
        ...

    def release(self, key: str) -> None:
        """Forget `key` (after a fire failed, so that it can be claimed again)."""
        ...

    def renew(self, key: str, lease: timedelta) -> None:
        """Keep holding `key` for another `lease` (while its fan-out runs)."""
        ...

    def finish(self, key: str, ttl: timedelta) -> None:
        """Mark `key` done for `ttl`: its work was enqueued in full."""
        ...

    def is_done(self, key: str) -> bool:
        """True if `key` was finished (not merely claimed by a fan-out still running)."""
        ...


def owner_name() -> str:
    """Who holds a lock: host and process id, for people reading Redis."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisFireLock:
    """Fire keys in Redis, under `{namespace}:scheduler:`."""

    def __init__(self, client: redis.Redis, *, namespace: str) -> None:
        self.client = client
        self.prefix = f"{namespace}:scheduler:"
        self.owner = owner_name()

    def claim(self, key: str, ttl: timedelta) -> bool:
        """`SET … NX PX`: atomic, so two schedulers never both win."""
        won = self.client.set(self.prefix + key, self.owner, nx=True, px=_ms(ttl))
        return bool(won)

    def release(self, key: str) -> None:
        self.client.delete(self.prefix + key)

    def renew(self, key: str, lease: timedelta) -> None:
        self.client.set(self.prefix + key, self.owner, xx=True, px=_ms(lease))

    def finish(self, key: str, ttl: timedelta) -> None:
        self.client.set(self.prefix + key, f"{DONE}{self.owner}", px=_ms(ttl))

    def is_done(self, key: str) -> bool:
        value = self.client.get(self.prefix + key)
        return isinstance(value, bytes | str) and _text(value).startswith(DONE)


class LocalFireLock:
    """Fire keys in this process only (one scheduler per process, no Redis)."""

    def __init__(self) -> None:
        self._expiries: dict[str, float] = {}
        self._done: set[str] = set()
        self._mutex = threading.Lock()

    def claim(self, key: str, ttl: timedelta) -> bool:
        now = time.monotonic()
        with self._mutex:
            if self._expiries.get(key, 0.0) > now:
                return False
            self._expiries[key] = now + ttl.total_seconds()
            self._done.discard(key)
            return True

    def release(self, key: str) -> None:
        with self._mutex:
            self._expiries.pop(key, None)
            self._done.discard(key)

    def renew(self, key: str, lease: timedelta) -> None:
        with self._mutex:
            if key in self._expiries:
                self._expiries[key] = time.monotonic() + lease.total_seconds()

    def finish(self, key: str, ttl: timedelta) -> None:
        with self._mutex:
            self._expiries[key] = time.monotonic() + ttl.total_seconds()
            self._done.add(key)

    def is_done(self, key: str) -> bool:
        with self._mutex:
            return key in self._done and self._expiries.get(key, 0.0) > time.monotonic()


DONE = "done:"
"""Prefix of a finished fire's value (the rest names who finished it)."""


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
