"""The API-key cache: no key lookup while the revocation marker holds, a revoked key refused
on the next request, the marker and the TTL bounding what is kept, the database the authority."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import anyio
import fakeredis
import fakeredis.aioredis
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from billing.api import add_billing, register_error_handlers
from billing.api.keycache import KeyLookup, RedisRevocationMarker
from billing.api.keys import create_key, revoke_key
from billing.api.models import ApiKey

TTL = timedelta(seconds=5)


class Ticks:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DeadMarker:
    """A marker whose Redis is down."""

    def current(self) -> bytes | None:
        raise RedisConnectionError("Redis is down")

    def bump(self) -> None:
        raise RedisConnectionError("Redis is down")


class DeadAsyncMarker(DeadMarker):
    """A marker read from the event loop whose Redis is down."""

    async def acurrent(self) -> bytes | None:
        raise RedisConnectionError("Redis is down")


@pytest.fixture(params=["sync", "async"])
def marker(request: pytest.FixtureRequest) -> RedisRevocationMarker:
    """The marker as `billing keys revoke` bumps it, read by a sync client, or (as `billing.app`
    reads it) by an async client on the same Redis."""
    server = fakeredis.FakeServer()
    async_client = fakeredis.aioredis.FakeRedis(server=server) if request.param == "async" else None
    return RedisRevocationMarker(
        fakeredis.FakeRedis(server=server), namespace="test", async_client=async_client
    )


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def key_reads(engine: Engine) -> Iterator[list[str]]:
    """The key lookups (by hash) run on `api_keys`."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if "api_keys.key_hash =" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def client_for(session_factory: sessionmaker[Session], keys: KeyLookup) -> TestClient:
    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, keys=keys)
    return TestClient(app, raise_server_exceptions=False)


def new_key(session_factory: sessionmaker[Session]) -> tuple[str, dict[str, str]]:
    with session_factory.begin() as session:
        key, plaintext = create_key(session, tenant_id="A", scopes=["billing.read"])
        return key.id, {"Authorization": f"Bearer {plaintext}"}


def revoke(session_factory: sessionmaker[Session], key_id: str) -> None:
    with session_factory.begin() as session:
        revoke_key(session, key_id)


def test_a_cached_key_is_not_read_again_while_the_marker_holds(
    session_factory, marker, ticks, key_reads
) -> None:
    _, headers = new_key(session_factory)
    client = client_for(session_factory, KeyLookup(marker=marker, ttl=TTL, clock=ticks))
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    assert len(key_reads) == 1


def test_a_key_revoked_and_announced_is_refused_on_the_next_request(
    session_factory, marker, ticks
) -> None:
    key_id, headers = new_key(session_factory)
    client = client_for(session_factory, KeyLookup(marker=marker, ttl=TTL, clock=ticks))
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    revoke(session_factory, key_id)
    marker.bump()  # what `billing keys revoke` does after its commit
    refused = client.get("/_billing/usage", headers=headers)
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"


def test_an_entry_expires_after_the_ttl(session_factory, marker, ticks, key_reads) -> None:
    key_id, headers = new_key(session_factory)
    client = client_for(session_factory, KeyLookup(marker=marker, ttl=TTL, clock=ticks))
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    revoke(session_factory, key_id)  # not announced: only the TTL bounds the entry
    ticks.now += TTL.total_seconds() - 0.001
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    ticks.now += 0.001
    assert client.get("/_billing/usage", headers=headers).status_code == 401
    assert len(key_reads) == 2


def test_the_marker_lost_is_a_new_marker(session_factory, marker, ticks, key_reads) -> None:
    _, headers = new_key(session_factory)
    client = client_for(session_factory, KeyLookup(marker=marker, ttl=TTL, clock=ticks))
    marker.bump()
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    marker.client.flushall()
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    assert len(key_reads) == 2


def test_an_unreadable_marker_reads_every_key_from_the_database(
    session_factory, ticks, key_reads
) -> None:
    key_id, headers = new_key(session_factory)
    client = client_for(session_factory, KeyLookup(marker=DeadMarker(), ttl=TTL, clock=ticks))
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    revoke(session_factory, key_id)
    assert client.get("/_billing/usage", headers=headers).status_code == 401
    assert len(key_reads) == 3


def test_an_unreadable_async_marker_reads_every_key_from_the_database(
    session_factory, ticks, key_reads
) -> None:
    key_id, headers = new_key(session_factory)
    keys = KeyLookup(marker=DeadAsyncMarker(), ttl=TTL, clock=ticks)
    client = client_for(session_factory, keys)
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    revoke(session_factory, key_id)
    assert client.get("/_billing/usage", headers=headers).status_code == 401
    assert len(key_reads) == 2
    assert keys._entries == {}


def test_a_kept_key_under_an_async_marker_costs_no_thread(
    session_factory, ticks, monkeypatch
) -> None:
    server = fakeredis.FakeServer()
    marker = RedisRevocationMarker(
        fakeredis.FakeRedis(server=server),
        async_client=fakeredis.aioredis.FakeRedis(server=server),
    )
    keys = KeyLookup(marker=marker, ttl=TTL, clock=ticks)
    _, headers = new_key(session_factory)
    plaintext = headers["Authorization"].removeprefix("Bearer ")
    hops: list[str] = []

    async def counted(function, *args):
        hops.append(function.__name__)
        return function(*args)

    monkeypatch.setattr("billing.api.keycache.run_sync", counted)
    with session_factory() as session:
        first = anyio.run(keys.afind, session, plaintext)
        again = anyio.run(keys.afind, session, plaintext)
        marker.bump()
        after_bump = anyio.run(keys.afind, session, plaintext)
    assert first is not None
    assert again == first
    assert after_bump == first
    assert hops == ["read_active_key", "read_active_key"]  # the first read, and after the bump


def test_without_a_marker_every_request_reads_its_key(session_factory, key_reads) -> None:
    key_id, headers = new_key(session_factory)
    client = client_for(session_factory, KeyLookup())
    assert client.get("/_billing/usage", headers=headers).status_code == 200
    revoke(session_factory, key_id)
    assert client.get("/_billing/usage", headers=headers).status_code == 401
    assert len(key_reads) == 2


def test_unknown_and_malformed_keys_are_refused_and_not_kept(
    session_factory, marker, ticks
) -> None:
    keys = KeyLookup(marker=marker, ttl=TTL, clock=ticks)
    with session_factory() as session:
        assert keys.find(session, "bk_unknown") is None
        assert keys.find(session, "not-a-key") is None
        assert keys.find(session, "bk_" + "x" * 300) is None
    assert keys._entries == {}


def test_a_full_cache_starts_over(session_factory, marker, ticks, monkeypatch) -> None:
    monkeypatch.setattr("billing.api.keycache.MAX_ENTRIES", 2)
    keys = KeyLookup(marker=marker, ttl=TTL, clock=ticks)
    plaintexts = []
    with session_factory.begin() as session:
        for _ in range(3):
            plaintexts.append(create_key(session, tenant_id="A", scopes=["billing.read"])[1])
    with session_factory() as session:
        found = [keys.find(session, plaintext) for plaintext in plaintexts]
        ids = set(session.scalars(select(ApiKey.id)))
    assert {key.id for key in found if key is not None} == ids
    assert len(keys._entries) == 1
