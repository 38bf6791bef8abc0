"""What a request may be: bodies over the limit (413, before they are read whole), bodies that
are not JSON (415), unserved methods (405 with every allowed method), strict booleans, crafted
cursors (422, never 500), and an invoice's lines a page at a time."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.routing import Mount

from billing.api import IdempotencyMiddleware, add_billing, register_error_handlers
from billing.api.pagination import encode_cursor
from billing.models import Invoice, InvoiceLine, UsageEvent

from .conftest import NOW

EVENT = {"metric": "tokens", "amount": 1, "idempotency_key": "k", "at": NOW.isoformat()}


def stored_events(session_factory) -> int:
    with session_factory() as session:
        return session.execute(select(func.count()).select_from(UsageEvent)).scalar_one()


@pytest.fixture
def small_limits_app(session_factory, clock) -> FastAPI:
    """An app whose bodies may be 2,000 bytes, 20,000 on the batch route."""
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store={}, max_body_bytes=20_000)
    register_error_handlers(app)
    add_billing(
        app,
        session_factory=session_factory,
        clock=clock,
        max_request_bytes=2_000,
        max_batch_request_bytes=20_000,
    )
    return app


@pytest.fixture
def small_limits(small_limits_app) -> TestClient:
    return TestClient(small_limits_app, raise_server_exceptions=False)


def under_api(app: FastAPI, served: str) -> TestClient:
    """A client of `app` served under `/api`: mounted in a host app, or behind a proxy that
    passes the root path (`uvicorn --root-path /api`)."""
    if served == "mounted":
        host = Starlette(routes=[Mount("/api", app=app)])
        return TestClient(host, raise_server_exceptions=False)
    return TestClient(app, root_path="/api", raise_server_exceptions=False)


def padded(size: int) -> bytes:
    """A JSON event `size` bytes long (its metadata is padding)."""
    body = {**EVENT, "metadata": {"pad": ""}}
    raw = json.dumps(body).encode()
    body["metadata"] = {"pad": "x" * (size - len(raw))}
    return json.dumps(body).encode()


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_body_over_the_limit_answers_413_and_stores_nothing(
    small_limits, a_key, session_factory, idempotent
) -> None:
    headers = {**a_key, "Content-Type": "application/json"}
    if idempotent:
        headers["Idempotency-Key"] = "big"
    response = small_limits.post("/_billing/usage", content=padded(2_001), headers=headers)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:billing:problem:body-too-large"
    assert stored_events(session_factory) == 0
    fits = small_limits.post("/_billing/usage", content=padded(2_000), headers=headers)
    assert fits.status_code == 202


@pytest.mark.parametrize("served", ["mounted", "root_path"])
def test_a_body_over_the_limit_answers_413_under_a_root_path(
    small_limits_app, a_key, session_factory, served
) -> None:
    client = under_api(small_limits_app, served)
    headers = {**a_key, "Content-Type": "application/json"}
    response = client.post("/api/_billing/usage", content=padded(2_001), headers=headers)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "the request body is over 2000 bytes"
    assert stored_events(session_factory) == 0
    assert client.post("/api/_billing/usage", content=padded(2_000), headers=headers).is_success


@pytest.mark.parametrize("idempotency", [{"Idempotency-Key": "chunked"}, {}])
def test_a_chunked_body_over_the_route_s_limit_names_that_limit(
    small_limits, a_key, session_factory, idempotency
) -> None:
    body = padded(2_001)
    headers = {**a_key, "Content-Type": "application/json", **idempotency}
    response = small_limits.post(
        "/_billing/usage", content=iter([body[:1_000], body[1_000:]]), headers=headers
    )
    assert response.status_code == 413
    assert response.json()["type"] == "urn:billing:problem:body-too-large"
    assert response.json()["detail"] == "the request body is over 2000 bytes"
    assert stored_events(session_factory) == 0


def test_the_batch_route_has_its_own_limit(small_limits, a_key, session_factory) -> None:
    events = [{**EVENT, "idempotency_key": f"k{i}"} for i in range(150)]
    body = json.dumps({"events": events}).encode()
    assert 2_000 < len(body) < 20_000
    headers = {**a_key, "Content-Type": "application/json"}
    assert small_limits.post("/_billing/usage/batch", content=body, headers=headers).is_success
    assert stored_events(session_factory) == 150
    too_big = json.dumps({"events": events * 2, "all_or_nothing": False}).encode() * 2
    response = small_limits.post("/_billing/usage/batch", content=too_big, headers=headers)
    assert response.status_code == 413


def test_the_idempotency_middleware_stops_at_its_own_limit(session_factory, a_key) -> None:
    app = FastAPI()
    add_billing(app, session_factory=session_factory, max_request_bytes=100_000)
    app.add_middleware(IdempotencyMiddleware, store={}, max_body_bytes=1_000)  # outermost
    headers = {**a_key, "Content-Type": "application/json", "Idempotency-Key": "k"}
    with TestClient(app) as client:
        response = client.post("/_billing/usage", content=padded(1_001), headers=headers)
    assert response.status_code == 413
    assert stored_events(session_factory) == 0


def test_the_host_app_s_own_routes_keep_their_bodies(session_factory) -> None:
    app = FastAPI()
    add_billing(app, session_factory=session_factory, max_request_bytes=10)

    @app.post("/upload")
    async def upload(body: dict) -> int:
        return len(body["data"])

    with TestClient(app) as client:
        assert client.post("/upload", json={"data": "x" * 1000}).json() == 1000


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_that_is_not_json_answers_415(client, a_key, session_factory, content_type) -> None:
    headers = dict(a_key)
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/_billing/usage", content=json.dumps(EVENT).encode(), headers=headers)
    assert response.status_code == 415
    assert response.json()["type"] == "urn:billing:problem:unsupported-media-type"
    assert stored_events(session_factory) == 0


def test_json_with_parameters_or_a_json_suffix_is_json(client, a_key) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        body = json.dumps({**EVENT, "idempotency_key": content_type}).encode()
        headers = {**a_key, "Content-Type": content_type}
        assert client.post("/_billing/usage", content=body, headers=headers).status_code == 202


def test_a_post_without_a_body_needs_no_content_type(client, operator) -> None:
    missing = "/_billing/invoices/00000000-0000-0000-0000-000000000000/void"
    assert client.post(missing, headers=operator).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/_billing/usage", "GET, HEAD, POST"),
        ("PUT", "/_billing/plans", "GET, HEAD, POST"),
        ("POST", "/_billing/quotas", "GET, HEAD"),
        ("GET", "/_billing/usage/batch", "POST"),
    ],
)
def test_405_names_every_allowed_method(client, a_key, method, path, allowed) -> None:
    response = client.request(method, path, headers=a_key)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed


@pytest.mark.parametrize("served", ["mounted", "root_path"])
def test_405_names_every_allowed_method_under_a_root_path(app, a_key, served) -> None:
    response = under_api(app, served).request("DELETE", "/api/_billing/usage", headers=a_key)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("value", ["true", 1, "yes", None])
def test_all_or_nothing_is_a_strict_boolean(client, a_key, session_factory, value) -> None:
    body = {"events": [EVENT], "all_or_nothing": value}
    response = client.post("/_billing/usage/batch", json=body, headers=a_key)
    assert (response.status_code, response.json()["field"]) == (422, "all_or_nothing")
    assert stored_events(session_factory) == 0


def raw_cursor(values: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


CRAFTED = [
    encode_cursor("0001-01-01T00:00:00+05:00", "x"),
    encode_cursor("9999-12-31T23:59:59-05:00", "x"),
    encode_cursor("2025-01-01T00:00:00", "x"),
    encode_cursor("2025-01-01T00:00:00+00:00", "\ud800"),
    encode_cursor("2025-01-01T00:00:00+00:00", "\x00"),
    encode_cursor("2025-01-01T00:00:00+00:00", 7),
    encode_cursor("2025-01-01T00:00:00+00:00", "x" * 300),
    encode_cursor(20250101, "x"),
    encode_cursor(["2025-01-01T00:00:00+00:00"], "x"),
    raw_cursor("[" * 100 + "]" * 100),
    raw_cursor({"a": 1}),
    "garbage!",
]


@pytest.fixture
def invoice_with_lines(session_factory) -> str:
    """An invoice of tenant A with 250 lines."""
    with session_factory.begin() as session:
        invoice = Invoice(
            tenant_id="A",
            period_start=datetime(2025, 2, 1, tzinfo=UTC),
            period_end=datetime(2025, 3, 1, tzinfo=UTC),
            total_amount=250,
            currency="usd",
        )
        session.add(invoice)
        session.flush()
        session.add_all(
            InvoiceLine(
                invoice_id=invoice.id,
                metric=f"m{i:03}",
                quantity=i,
                amount=1,
                created_at=NOW + timedelta(seconds=i % 7),
            )
            for i in range(250)
        )
        return invoice.id


@pytest.mark.parametrize("cursor", CRAFTED)
def test_a_crafted_cursor_answers_422_on_every_paginated_route(
    client, a_key, operator, invoice_with_lines, cursor
) -> None:
    routes = [
        ("/_billing/usage", a_key),
        ("/_billing/invoices", a_key),
        (f"/_billing/invoices/{invoice_with_lines}/lines", a_key),
        ("/_billing/tenants/A/invoices", operator),
        (f"/_billing/tenants/A/invoices/{invoice_with_lines}/lines", operator),
    ]
    for path, headers in routes:
        response = client.get(path, params={"cursor": cursor}, headers=headers)
        assert (response.status_code, response.json()["field"]) == (422, "cursor"), path


def test_an_invoice_s_lines_come_a_page_at_a_time(
    client, a_key, operator, invoice_with_lines
) -> None:
    detail = client.get(f"/_billing/invoices/{invoice_with_lines}", headers=a_key).json()
    assert len(detail["lines"]) == 100
    seen = [line["metric"] for line in detail["lines"]]
    cursor = detail["next_lines_cursor"]
    path = f"/_billing/invoices/{invoice_with_lines}/lines"
    while cursor is not None:
        page = client.get(path, params={"cursor": cursor, "limit": 70}, headers=a_key).json()
        seen += [line["metric"] for line in page["items"]]
        cursor = page["next_cursor"]
    assert sorted(seen) == [f"m{i:03}" for i in range(250)]
    assert len(set(seen)) == 250
    everything = client.get(
        f"/_billing/tenants/A/invoices/{invoice_with_lines}/lines",
        params={"limit": 1000},
        headers=operator,
    ).json()
    assert (len(everything["items"]), everything["next_cursor"]) == (250, None)


def test_another_tenant_s_invoice_lines_are_not_found(client, make_key, invoice_with_lines) -> None:
    b = make_key("B")
    response = client.get(f"/_billing/invoices/{invoice_with_lines}/lines", headers=b)
    assert response.status_code == 404
