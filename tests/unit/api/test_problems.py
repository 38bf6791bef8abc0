"""Errors are RFC 9457 problem+json, and bad input is never a 500."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import DataError


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["type"]
    return body


def test_an_unknown_route_and_a_wrong_method_are_problems(client, a_key) -> None:
    assert_problem(client.get("/_billing/nothing", headers=a_key), 404)
    assert_problem(client.delete("/_billing/usage", headers=a_key), 405)


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b"\xff\xfe", b"[1, 2", b'{"metric": "\\ud800"}']
)
def test_a_body_that_is_not_json_answers_400_or_422(client, a_key, content) -> None:
    response = client.post(
        "/_billing/usage", content=content, headers={**a_key, "content-type": "application/json"}
    )
    assert response.status_code in (400, 422)
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"granularity": "week"}, "granularity"),
        ({"from": "2025-01-01T00:00:00"}, "from"),
        ({"metric": "x" * 101}, "metric"),
    ],
)
def test_bad_query_parameters_answer_422_naming_them(client, a_key, params, field) -> None:
    body = assert_problem(client.get("/_billing/usage", params=params, headers=a_key), 422)
    assert body["field"] == field
    assert body["errors"][0]["location"] == "query"


@pytest.mark.parametrize(
    "body",
    [
        {"metric": "m", "amount": 2**63 - 1, "idempotency_key": "big-1"},
        {"metric": "m\u0000", "amount": 1, "idempotency_key": "k"},
        {"metric": "m", "amount": 1, "idempotency_key": "k", "metadata": {"\u0000": "\u0000"}},
        {"metric": "m", "amount": 1, "idempotency_key": "k", "at": "9999-12-31T23:59:59-23:59"},
        b'{"metric": "m", "amount": 1, "idempotency_key": "k", "metadata": {"n": 1e400}}',
        b'{"metric": "m", "amount": 1e400, "idempotency_key": "k"}',
        b'{"metric": "m", "amount": 1, "idempotency_key": "k", "metadata": '
        + b"[" * 5000
        + b"]" * 5000
        + b"}",
        {"metric": "\U0001f600" * 100, "amount": 1, "idempotency_key": "\U0001f600" * 255},
    ],
)
def test_edge_values_are_stored_or_refused_never_a_500(client, a_key, body) -> None:
    if isinstance(body, bytes):
        headers = {**a_key, "content-type": "application/json"}
        response = client.post("/_billing/usage", content=body, headers=headers)
    else:
        response = client.post("/_billing/usage", json=body, headers=a_key)
    assert response.status_code in (202, 400, 409, 422), response.text


def test_a_counter_that_would_overflow_refuses_the_event(client, a_key) -> None:
    big = {"metric": "m", "amount": 2**63 - 1, "at": "2025-03-15T00:00:00Z"}
    first = client.post("/_billing/usage", json={**big, "idempotency_key": "1"}, headers=a_key)
    second = client.post("/_billing/usage", json={**big, "idempotency_key": "2"}, headers=a_key)
    assert first.status_code == 202
    assert_problem(second, second.status_code)
    assert second.status_code in (400, 409)
    usage = client.get("/_billing/usage", headers=a_key).json()["items"]
    assert usage[0]["total"] == 2**63 - 1


def test_an_unexpected_error_is_a_500_problem_without_internals(app, client) -> None:
    @app.get("/broken")
    def broken() -> None:
        raise RuntimeError("secret detail")

    body = assert_problem(client.get("/broken"), 500)
    assert "secret" not in str(body)


def test_an_unexpected_error_logs_its_path_with_escapes_neutralised(app, client, caplog) -> None:
    @app.get("/broken/{name}")
    def broken(name: str) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="billing.api.problems"):
        assert_problem(client.get("/broken/%1b[2J"), 500)
    [message] = [r.getMessage() for r in caplog.records if r.name == "billing.api.problems"]
    assert message == "unhandled error on GET /broken/\\x1b[2J"


def test_a_refused_value_is_logged_with_escapes_neutralised(app, client, caplog) -> None:
    @app.get("/refused")
    def refused() -> None:
        raise DataError("INSERT", {}, Exception('invalid input "\x1b[2J"'))

    with caplog.at_level(logging.INFO, logger="billing.api.problems"):
        assert_problem(client.get("/refused"), 400)
    [message] = [r.getMessage() for r in caplog.records if r.name == "billing.api.problems"]
    assert "\x1b" not in message
    assert message.startswith("database rejected a value: ")
    assert 'invalid input "\\x1b[2J"' in message


def test_openapi_describes_every_route_and_the_problem_schema(client) -> None:
    schema = client.get("/openapi.json").json()
    assert "Problem" in schema["components"]["schemas"]
    usage = schema["paths"]["/_billing/usage"]["post"]["responses"]
    assert {"202", "200", "409", "422"} <= set(usage)
    assert "application/problem+json" in usage["409"]["content"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
