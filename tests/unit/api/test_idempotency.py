"""IdempotencyMiddleware with the in-memory store, fakeredis and the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
import fakeredis
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy import select

from billing.api import (
    IdempotencyMiddleware,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    add_billing,
    register_error_handlers,
)
from billing.api.keys import revoke_key
from billing.api.models import ApiKey
from billing.api.problems import ProblemError

A = {"Authorization": "Bearer key-of-a"}
B = {"Authorization": "Bearer key-of-b"}


class Recorder:
    """An app whose POST routes count their executions."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = anyio.Event()
        self.started = anyio.Event()
        self.fail_next = False
        self.refuse_next: int | None = None

    def app(self, store, **options) -> FastAPI:
        app = FastAPI()
        app.add_middleware(IdempotencyMiddleware, store=store, **options)
        register_error_handlers(app)

        @app.post("/things", status_code=201)
        async def create(request: Request) -> JSONResponse:
            self.runs += 1
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("boom")
            if self.refuse_next:
                status, self.refuse_next = self.refuse_next, None
                raise ProblemError(status, "Refused")
            body = await request.json()
            return JSONResponse(
                {"run": self.runs, "echo": body}, status_code=201, headers={"X-Run": str(self.runs)}
            )

        @app.post("/other")
        async def other() -> dict:
            self.runs += 1
            return {"run": self.runs}

        @app.post("/slow")
        async def slow() -> dict:
            self.runs += 1
            self.started.set()
            await self.release.wait()
            return {"run": self.runs}

        @app.get("/things")
        async def read() -> dict:
            self.runs += 1
            return {"run": self.runs}

        return app


Run = Callable[[Callable[[httpx.AsyncClient, Recorder], Awaitable[None]]], None]


@pytest.fixture(params=["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def make_store(request):
    """A factory of fresh stores of each kind (Redis ones namespaced per test)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    if request.param == "memory":
        return lambda: MemoryIdempotencyStore()
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        return lambda: RedisIdempotencyStore(fakeredis.FakeAsyncRedis(server=server), prefix=prefix)
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_namespace") + ":"
    from redis.asyncio import Redis

    return lambda: RedisIdempotencyStore(Redis.from_url(url), prefix=prefix)


@pytest.fixture
def run(make_store) -> Run:
    def runner(scenario, **options) -> None:
        async def main() -> None:
            recorder = Recorder()
            store = make_store()
            app = recorder.app(store, **options)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                await scenario(client, recorder)
            if isinstance(store, RedisIdempotencyStore):
                await store.client.aclose()

        anyio.run(main)

    return runner


def key(value: str = "k1") -> dict[str, str]:
    return {"Idempotency-Key": value}


def test_the_same_key_and_body_replays_the_stored_response(run) -> None:
    async def scenario(client, recorder) -> None:
        first = await client.post("/things", json={"a": 1}, headers={**A, **key()})
        again = await client.post("/things", json={"a": 1}, headers={**A, **key()})
        assert recorder.runs == 1
        assert (again.status_code, again.json(), again.headers["x-run"]) == (
            201,
            first.json(),
            "1",
        )
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers

    run(scenario)


def test_the_same_key_with_another_body_answers_409(run) -> None:
    async def scenario(client, recorder) -> None:
        await client.post("/things", json={"a": 1}, headers={**A, **key()})
        other = await client.post("/things", json={"a": 2}, headers={**A, **key()})
        assert other.status_code == 409
        assert other.headers["content-type"] == "application/problem+json"
        assert other.json()["type"] == "urn:billing:problem:idempotency-key-reused"
        assert recorder.runs == 1

    run(scenario)


def test_a_request_still_in_flight_with_the_key_answers_409_and_is_not_run(run) -> None:
    async def scenario(client, recorder) -> None:
        results = {}

        async def first() -> None:
            results["first"] = await client.post("/slow", headers={**A, **key()})

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            await recorder.started.wait()
            second = await client.post("/slow", headers={**A, **key()})
            recorder.release.set()
        assert second.status_code == 409
        assert second.json()["type"] == "urn:billing:problem:idempotency-in-progress"
        assert results["first"].status_code == 200
        assert recorder.runs == 1

    run(scenario)


def test_the_key_is_scoped_by_principal_and_by_route(run) -> None:
    async def scenario(client, recorder) -> None:
        mine = await client.post("/things", json={"a": 1}, headers={**A, **key()})
        theirs = await client.post("/things", json={"a": 1}, headers={**B, **key()})
        anonymous = await client.post("/things", json={"a": 1}, headers=key())
        elsewhere = await client.post("/other", headers={**A, **key()})
        assert [r.json()["run"] for r in (mine, theirs, anonymous, elsewhere)] == [1, 2, 3, 4]
        assert "idempotent-replayed" not in theirs.headers

    run(scenario)


def test_a_server_error_is_not_stored_and_the_retry_runs(run) -> None:
    async def scenario(client, recorder) -> None:
        recorder.fail_next = True
        failed = await client.post("/things", json={}, headers={**A, **key()})
        retried = await client.post("/things", json={}, headers={**A, **key()})
        assert (failed.status_code, retried.status_code, recorder.runs) == (500, 201, 2)

    run(scenario)


@pytest.mark.parametrize("status", [400, 401, 403, 413, 415, 422, 429])
def test_requests_refused_before_they_ran_are_not_stored(run, status) -> None:
    async def scenario(client, recorder) -> None:
        recorder.refuse_next = status
        refused = await client.post("/things", json={}, headers={**A, **key()})
        retried = await client.post("/things", json={}, headers={**A, **key()})
        assert (refused.status_code, retried.status_code, recorder.runs) == (status, 201, 2)

    run(scenario)


@pytest.mark.parametrize("status", [404, 409])
def test_a_refusal_of_a_request_that_ran_is_stored_and_replayed(run, status) -> None:
    async def scenario(client, recorder) -> None:
        recorder.refuse_next = status
        await client.post("/things", json={}, headers={**A, **key()})
        again = await client.post("/things", json={}, headers={**A, **key()})
        assert (again.status_code, recorder.runs) == (status, 1)

    run(scenario)


def test_requests_without_the_header_or_not_posts_pass_through(run) -> None:
    async def scenario(client, recorder) -> None:
        await client.post("/things", json={}, headers=A)
        await client.post("/things", json={}, headers=A)
        await client.get("/things", headers={**A, **key()})
        await client.get("/things", headers={**A, **key()})
        assert recorder.runs == 4

    run(scenario)


@pytest.mark.parametrize("value", ["", "   ", "k" * 256])
def test_a_malformed_key_answers_400(run, value) -> None:
    async def scenario(client, recorder) -> None:
        response = await client.post("/things", json={}, headers={**A, **key(value)})
        assert (response.status_code, recorder.runs) == (400, 0)

    run(scenario)


def test_a_stored_response_expires_after_the_ttl(make_store, request) -> None:
    async def main() -> None:
        recorder = Recorder()
        store = make_store()
        ttl = timedelta(milliseconds=200)
        if isinstance(store, MemoryIdempotencyStore):
            now = [0.0]
            store.clock = lambda: now[0]

            async def wait() -> None:
                now[0] += 1

        else:

            async def wait() -> None:
                await anyio.sleep(0.3)

        app = recorder.app(store, ttl=ttl)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/things", json={}, headers={**A, **key()})
            await client.post("/things", json={}, headers={**A, **key()})
            assert recorder.runs == 1
            await wait()
            await client.post("/things", json={}, headers={**A, **key()})
            assert recorder.runs == 2
        if isinstance(store, RedisIdempotencyStore):
            await store.client.aclose()

    anyio.run(main)


def test_a_plain_dict_becomes_the_memory_store() -> None:
    data: dict = {}

    async def main() -> None:
        recorder = Recorder()
        transport = httpx.ASGITransport(app=recorder.app(data))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/things", json={}, headers={**A, **key()})
        assert len(data) == 1

    anyio.run(main)


def test_billing_usage_posts_are_replayed_for_the_same_tenant_only(
    client, a_key, make_key, session_factory
) -> None:
    body = {"metric": "tokens", "amount": 1, "idempotency_key": "e1"}
    first = client.post("/_billing/usage", json=body, headers={**a_key, **key("req-1")})
    again = client.post("/_billing/usage", json=body, headers={**a_key, **key("req-1")})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.headers["idempotent-replayed"] == "true"
    other = client.post("/_billing/usage", json=body, headers={**make_key("B"), **key("req-1")})
    assert other.status_code == 202
    assert other.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in other.headers


def test_a_caller_without_credentials_is_never_replayed_anothers_response(run) -> None:
    """Apps with their own auth (a gateway header here) must not share one anonymous scope."""

    async def scenario(client, recorder) -> None:
        first = await client.post("/things", json={"a": 1}, headers={"X-Tenant": "A", **key()})
        second = await client.post("/things", json={"a": 1}, headers={"X-Tenant": "B", **key()})
        assert recorder.runs == 2
        assert second.json()["run"] == 2
        assert "idempotent-replayed" not in second.headers
        assert first.json()["run"] == 1

    run(scenario)


def test_a_principal_function_names_callers_of_other_auth_schemes(run) -> None:
    def tenant_header(scope) -> str | None:
        headers = dict(scope["headers"])
        return headers.get(b"x-tenant", b"").decode() or None

    async def scenario(client, recorder) -> None:
        for tenant in ("A", "A", "B"):
            await client.post("/things", json={"a": 1}, headers={"X-Tenant": tenant, **key()})
        assert recorder.runs == 2  # A's retry replayed, B's request run as B's

    run(scenario, principal=tenant_header)


# --- callers, partial bodies, store outages, what is stored ---------------------------------


def test_the_scheme_s_spelling_does_not_make_another_caller(run) -> None:
    async def scenario(client, recorder) -> None:
        first = await client.post("/things", json={"a": 1}, headers={**A, **key()})
        for spelling in ("bearer key-of-a", "BEARER  key-of-a"):
            headers = {"Authorization": spelling, **key()}
            again = await client.post("/things", json={"a": 1}, headers=headers)
            assert again.json() == first.json()
            assert again.headers["idempotent-replayed"] == "true"
            other = await client.post("/things", json={"a": 2}, headers=headers)
            assert other.status_code == 409
        assert recorder.runs == 1

    run(scenario)


def test_a_revoked_api_key_gets_401_not_a_replay(client, a_key, session_factory) -> None:
    body = {"metric": "tokens", "amount": 1, "idempotency_key": "e1"}
    assert client.post("/_billing/usage", json=body, headers={**a_key, **key()}).is_success
    with session_factory.begin() as session:
        revoke_key(session, session.execute(select(ApiKey.id)).scalar_one())
    again = client.post("/_billing/usage", json=body, headers={**a_key, **key()})
    assert again.status_code == 401
    assert "idempotent-replayed" not in again.headers


def test_an_api_key_is_one_caller_however_its_scheme_is_spelt(client, a_key) -> None:
    body = {"metric": "tokens", "amount": 1, "idempotency_key": "e1"}
    first = client.post("/_billing/usage", json=body, headers={**a_key, **key()})
    lower = {"Authorization": a_key["Authorization"].replace("Bearer", "bearer"), **key()}
    other_body = client.post("/_billing/usage", json={**body, "amount": 2}, headers=lower)
    assert other_body.status_code == 409  # the same caller's key with another body
    again = client.post("/_billing/usage", json=body, headers=lower)
    assert (again.json(), again.headers["idempotent-replayed"]) == (first.json(), "true")


def test_a_body_that_did_not_arrive_whole_is_neither_run_nor_stored() -> None:
    recorder = Recorder()
    store = MemoryIdempotencyStore()
    app = recorder.app(store)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/things",
        "raw_path": b"/things",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", b"Bearer key-of-a"),
            (b"idempotency-key", b"k1"),
            (b"content-type", b"application/json"),
            (b"content-length", b"20"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    messages = [
        {"type": "http.request", "body": b'{"a": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> None:
        await app(scope, receive, send)
        assert (recorder.runs, store.data, sent) == (0, {}, [])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            whole = await client.post("/things", json={"a": 1}, headers={**A, **key()})
        assert (whole.status_code, recorder.runs) == (201, 1)

    anyio.run(main)


def test_redis_down_answers_503_with_retry_after_and_runs_nothing() -> None:
    from redis.asyncio import Redis

    async def main() -> None:
        recorder = Recorder()
        dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
        app = recorder.app(RedisIdempotencyStore(dead))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/things", json={}, headers={**A, **key()})
            plain = await client.post("/things", json={}, headers=A)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["type"] == "urn:billing:problem:idempotency-unavailable"
        assert (recorder.runs, plain.status_code) == (1, 201)  # only the request without a key
        await dead.aclose()

    anyio.run(main)


def test_a_response_over_the_size_cap_is_not_stored(run) -> None:
    async def scenario(client, recorder) -> None:
        big = {"pad": "x" * 200}
        first = await client.post("/things", json=big, headers={**A, **key()})
        again = await client.post("/things", json=big, headers={**A, **key()})
        assert (first.status_code, again.status_code, recorder.runs) == (201, 201, 2)
        assert "idempotent-replayed" not in again.headers

    run(scenario, max_stored_bytes=100)


def test_a_fully_rejected_batch_is_not_stored(client, a_key, session_factory) -> None:
    bad = {"events": [{"metric": "tokens", "amount": -1, "idempotency_key": "e1"}]}
    refused = client.post("/_billing/usage/batch", json=bad, headers={**a_key, **key()})
    assert (refused.status_code, refused.json()["type"]) == (
        422,
        "urn:billing:problem:batch-rejected",
    )
    good = {"events": [{"metric": "tokens", "amount": 1, "idempotency_key": "e1"}]}
    fixed = client.post("/_billing/usage/batch", json=good, headers={**a_key, **key()})
    assert fixed.status_code == 200
    assert fixed.json()["results"][0]["status"] == "accepted"


@pytest.mark.redis
def test_the_web_app_s_keys_live_under_the_broker_namespace(redis_url, session_factory) -> None:
    import redis

    from billing.api.keys import create_key
    from billing.api.settings import ApiSettings
    from billing.app import create_app

    namespace = f"test-{uuid.uuid4().hex}"
    with session_factory.begin() as session:
        _, plaintext = create_key(session, tenant_id="A", scopes=["billing.write"])
    settings = ApiSettings(redis_url=redis_url, broker_namespace=namespace)
    app = create_app(settings, session_factory=session_factory)
    body = {"metric": "tokens", "amount": 1, "idempotency_key": "e1"}
    headers = {"Authorization": f"Bearer {plaintext}", **key()}
    with TestClient(app) as client:
        assert client.post("/_billing/usage", json=body, headers=headers).status_code == 202
    sync = redis.Redis.from_url(redis_url)
    try:
        names = sync.keys(f"{namespace}:idempotency:*")
        assert len(names) == 1
        sync.delete(*names)
    finally:
        sync.close()


def test_a_database_down_while_naming_the_caller_answers_503(tmp_path, a_key) -> None:
    from billing.db import make_engine, make_session_factory

    gone = make_session_factory(make_engine(f"sqlite:///{tmp_path}/missing/dir/db.sqlite3"))
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store={})
    add_billing(app, session_factory=gone)
    body = {"metric": "tokens", "amount": 1, "idempotency_key": "e1"}
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/_billing/usage", json=body, headers={**a_key, **key()})
    assert (response.status_code, response.headers["retry-after"]) == (503, "5")
    assert response.json()["type"] == "urn:billing:problem:idempotency-unavailable"
