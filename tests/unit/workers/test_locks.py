"""Fire locks: a claim is one caller's, renewed only by it while unfinished, and a done marker
expires (LocalFireLock on a fake clock; RedisFireLock on fakeredis and on the real Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import fakeredis
import pytest
import redis

from workers.locks import DONE, LocalFireLock, RedisFireLock

KEY = "aggregate-daily:2025-01-03"
LEASE = timedelta(seconds=30)
TTL = timedelta(days=2)


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def redis_client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())
        return
    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield client
    client.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, redis_client: redis.Redis) -> str:
    if isinstance(redis_client, fakeredis.FakeRedis):
        return "t"
    return str(request.getfixturevalue("redis_namespace"))


def redis_locks(client: redis.Redis, namespace: str) -> tuple[RedisFireLock, RedisFireLock]:
    """Two schedulers sharing one Redis."""
    return RedisFireLock(client, namespace=namespace), RedisFireLock(client, namespace=namespace)


def pttl(client: redis.Redis, lock: RedisFireLock) -> int:
    return int(client.pttl(lock.prefix + KEY))


# --- RedisFireLock ----------------------------------------------------------------------------


def test_one_claim_of_a_key_wins(redis_client, namespace) -> None:
    mine, theirs = redis_locks(redis_client, namespace)
    assert mine.claim(KEY, LEASE)
    assert not theirs.claim(KEY, LEASE)
    assert not mine.claim(KEY, LEASE)


def test_renewing_a_released_key_does_not_recreate_it(redis_client, namespace) -> None:
    lock, _ = redis_locks(redis_client, namespace)
    assert lock.claim(KEY, LEASE)
    lock.release(KEY)
    assert lock.renew(KEY, LEASE) is False
    assert redis_client.exists(lock.prefix + KEY) == 0


def test_renewing_extends_only_our_own_claim(redis_client, namespace) -> None:
    mine, theirs = redis_locks(redis_client, namespace)
    assert mine.claim(KEY, timedelta(seconds=5))
    assert mine.renew(KEY, timedelta(minutes=10)) is True
    assert 5_000 < pttl(redis_client, mine) <= 600_000
    assert theirs.renew(KEY, timedelta(hours=1)) is False
    assert redis_client.get(mine.prefix + KEY) == mine.owner.encode()  # still mine
    assert pttl(redis_client, mine) <= 600_000


def test_renewing_a_finished_key_leaves_its_done_marker(redis_client, namespace) -> None:
    lock, _ = redis_locks(redis_client, namespace)
    assert lock.claim(KEY, LEASE)
    lock.finish(KEY, TTL)
    assert lock.renew(KEY, LEASE) is False
    assert lock.is_done(KEY)
    assert pttl(redis_client, lock) > LEASE.total_seconds() * 1000  # not cut to a lease


def test_a_done_marker_expires_after_its_ttl(redis_client, namespace) -> None:
    lock, _ = redis_locks(redis_client, namespace)
    assert lock.claim(KEY, LEASE)
    lock.finish(KEY, TTL)
    assert redis_client.get(lock.prefix + KEY) == f"{DONE}{lock.owner}".encode()
    ttl_ms = TTL.total_seconds() * 1000
    assert ttl_ms - 60_000 < pttl(redis_client, lock) <= ttl_ms


def test_releasing_gives_back_only_our_own_claim(redis_client, namespace) -> None:
    mine, theirs = redis_locks(redis_client, namespace)
    assert mine.claim(KEY, LEASE)
    theirs.release(KEY)  # a stalled run that lost its lease gives up
    assert not theirs.claim(KEY, LEASE)  # the holder still has it
    mine.release(KEY)
    assert theirs.claim(KEY, LEASE)


def test_a_claim_of_an_expired_done_key_is_not_done(redis_client, namespace) -> None:
    lock, _ = redis_locks(redis_client, namespace)
    lock.finish(KEY, TTL)
    redis_client.delete(lock.prefix + KEY)  # what its expiry does
    assert lock.claim(KEY, LEASE)
    assert not lock.is_done(KEY)


def test_a_client_that_decodes_responses_reads_done_markers() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    lock = RedisFireLock(client, namespace="t")
    assert lock.claim(KEY, LEASE)
    assert not lock.is_done(KEY)
    lock.finish(KEY, TTL)
    assert lock.is_done(KEY)


# --- LocalFireLock ----------------------------------------------------------------------------


def test_a_local_claim_wins_once_until_its_lease_ends(clock) -> None:
    lock = LocalFireLock(clock=clock)
    assert lock.claim(KEY, LEASE)
    clock.advance(LEASE - timedelta(seconds=1))
    assert not lock.claim(KEY, LEASE)
    clock.advance(timedelta(seconds=1))
    assert lock.claim(KEY, LEASE)


def test_a_local_renewal_extends_a_live_claim_only(clock) -> None:
    lock = LocalFireLock(clock=clock)
    assert lock.renew(KEY, LEASE) is False  # never claimed
    assert lock.claim(KEY, LEASE)
    clock.advance(LEASE / 2)
    assert lock.renew(KEY, LEASE) is True
    clock.advance(LEASE * 0.9)
    assert not lock.claim(KEY, LEASE)  # renewed: still held past the first lease
    clock.advance(LEASE)
    assert lock.renew(KEY, LEASE) is False  # ran out: someone else may claim it now
    lock.release(KEY)
    assert lock.renew(KEY, LEASE) is False


def test_a_local_lease_ends_at_its_expiry_exactly(clock) -> None:
    lock = LocalFireLock(clock=clock)
    lock.release(KEY)  # nothing to give back: no error
    assert lock.claim(KEY, LEASE)
    clock.advance(LEASE)
    assert lock.renew(KEY, LEASE) is False
    assert lock.claim(KEY, LEASE)


def test_a_local_renewal_leaves_a_done_marker(clock) -> None:
    lock = LocalFireLock(clock=clock)
    assert lock.claim(KEY, LEASE)
    lock.finish(KEY, TTL)
    assert lock.renew(KEY, LEASE) is False
    clock.advance(LEASE * 2)
    assert lock.is_done(KEY)
    assert not lock.claim(KEY, LEASE)


def test_a_local_done_marker_expires_after_its_ttl(clock) -> None:
    lock = LocalFireLock(clock=clock)
    assert lock.claim(KEY, LEASE)
    lock.finish(KEY, TTL)
    clock.advance(TTL - timedelta(seconds=1))
    assert lock.is_done(KEY)
    assert not lock.claim(KEY, LEASE)
    clock.advance(timedelta(seconds=1))
    assert not lock.is_done(KEY)
    assert lock.claim(KEY, LEASE)


def test_a_local_claim_after_a_done_marker_expired_is_not_done(clock) -> None:
    lock = LocalFireLock(clock=clock)
    lock.finish(KEY, TTL)
    clock.advance(TTL)
    assert lock.claim(KEY, LEASE)
    assert not lock.is_done(KEY)  # merely claimed: a waiting run must not skip it
