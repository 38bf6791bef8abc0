"""Fire locks: each scheduled fire is enqueued by one scheduler, however many run.

A fire has a key naming the work it stands for (`aggregate-daily:2025-01-31`,
`monthly-invoices:2025-01`), so two schedulers, even with clocks a little apart, claim the same
key. `RedisFireLock` claims with `SET key owner NX PX lease`: one caller wins, the others see the
key and skip. While the fan-out runs its owner renews that short lease (only its own, live,
unfinished claim: a renewal never re-creates a key, takes another's or shortens a `done`); when it
is done, the key becomes a `done` marker that outlives the fire (`FIRE_LOCK_TTL`), then expires,
which is how a restarted scheduler knows what it already enqueued. A scheduler that dies mid
fan-out stops renewing, so its lease runs out and another run (a retry, a restart's catch-up)
claims the fire again. `LocalFireLock` does the same inside one process, for the embedded
`billing run`.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple, Protocol

import redis


class FireLock(Protocol):
    """Claims fire keys; exactly one claim of a key succeeds until it expires or is released."""

    def claim(self, key: str, ttl: timedelta) -> bool:
        """True if this caller now owns `key`; False if someone claimed it already."""
        ...

    def release(self, key: str) -> None:
        """Give back our claim on `key` (after a fire failed, so that it can be claimed again)."""
        ...

    def renew(self, key: str, lease: timedelta) -> bool:
        """Hold our unfinished claim on `key` for another `lease`; False if it is no longer ours."""
        ...

    def finish(self, key: str, ttl: timedelta) -> None:
        """Mark `key` done for `ttl`: its work was enqueued in full."""
        ...

    def is_done(self, key: str) -> bool:
        """True if `key` was finished (not merely claimed by a fan-out still running)."""
        ...


def owner_name() -> str:
    """Who holds a lock: host, process id and a token per lock, for people reading Redis."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisFireLock:
    """Fire keys in Redis, under `{namespace}:scheduler:`."""

    def __init__(self, client: redis.Redis, *, namespace: str) -> None:
        self.client = client
        self.prefix = f"{namespace}:scheduler:"
        self.owner = owner_name()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def claim(self, key: str, ttl: timedelta) -> bool:
        """`SET … NX PX`: atomic, so two schedulers never both win."""
        won = self.client.set(self.prefix + key, self.owner, nx=True, px=_ms(ttl))
        return bool(won)

    def release(self, key: str) -> None:
        self._release(keys=[self.prefix + key], args=[self.owner])

    def renew(self, key: str, lease: timedelta) -> bool:
        return bool(self._renew(keys=[self.prefix + key], args=[self.owner, _ms(lease)]))

    def finish(self, key: str, ttl: timedelta) -> None:
        self.client.set(self.prefix + key, f"{DONE}{self.owner}", px=_ms(ttl))

    def is_done(self, key: str) -> bool:
        value = self.client.get(self.prefix + key)
        return isinstance(value, bytes | str) and _text(value).startswith(DONE)


class LocalFireLock:
    """Fire keys in this process only (one scheduler per process, no Redis)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # seconds, monotonic
        self._entries: dict[str, _Entry] = {}
        self._mutex = threading.Lock()

    def claim(self, key: str, ttl: timedelta) -> bool:
        with self._mutex:
            now = self._clock()
            if self._live(key, now) is not None:
                return False
            self._entries[key] = _Entry(now + ttl.total_seconds(), done=False)
            return True

    def release(self, key: str) -> None:
        with self._mutex:
            self._entries.pop(key, None)

    def renew(self, key: str, lease: timedelta) -> bool:
        with self._mutex:
            now = self._clock()
            entry = self._live(key, now)
            if entry is None or entry.done:
                return False
            self._entries[key] = entry._replace(expires=now + lease.total_seconds())
            return True

    def finish(self, key: str, ttl: timedelta) -> None:
        with self._mutex:
            self._entries[key] = _Entry(self._clock() + ttl.total_seconds(), done=True)

    def is_done(self, key: str) -> bool:
        with self._mutex:
            entry = self._live(key, self._clock())
            return entry is not None and entry.done

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.expires > now else None


class _Entry(NamedTuple):
    expires: float  # on the lock's clock
    done: bool


DONE = "done:"
"""Prefix of a finished fire's value (the rest names who finished it)."""

# Compare-and-act on the owner, atomically: a lease that ran out may already be another's claim.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
