"""Fire locks: each scheduled fire is enqueued by one scheduler, however many run.

A fire has a key naming the work it stands for (`aggregate-daily:2025-01-31`,
`monthly-invoices:2025-01`), so two schedulers, even with clocks a little apart, claim the same
key. `RedisFireLock` claims with `SET key owner NX PX ttl`: one caller wins, the others see the
key and skip. The key outlives the fire (`FIRE_LOCK_TTL`), which is also how a restarted
scheduler knows what it already enqueued. `LocalFireLock` does the same inside one process, for
the embedded `billing run`.
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
        won = self.client.set(
            self.prefix + key, self.owner, nx=True, px=int(ttl.total_seconds() * 1000)
        )
        return bool(won)

    def release(self, key: str) -> None:
        self.client.delete(self.prefix + key)


class LocalFireLock:
    """Fire keys in this process only (one scheduler per process, no Redis)."""

    def __init__(self) -> None:
        self._expiries: dict[str, float] = {}
        self._mutex = threading.Lock()

    def claim(self, key: str, ttl: timedelta) -> bool:
        now = time.monotonic()
        with self._mutex:
            if self._expiries.get(key, 0.0) > now:
                return False
            self._expiries[key] = now + ttl.total_seconds()
            return True

    def release(self, key: str) -> None:
        with self._mutex:
            self._expiries.pop(key, None)
