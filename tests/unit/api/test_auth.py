"""API keys: bearer auth, hashed storage, scopes, revocation, a pluggable principal."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient
from sqlalchemy import select

from billing.api import Principal, add_billing, register_error_handlers
from billing.api.keys import create_key, hash_key, revoke_key
from billing.api.models import ApiKey
from billing.errors import InvalidUsageError

USAGE = {"metric": "tokens", "amount": 1, "idempotency_key": "k"}


def test_a_request_without_a_key_answers_401_with_a_bearer_challenge(client) -> None:
    response = client.get("/_billing/usage")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/problem+json"
    assert "`billing keys create --tenant TENANT" in response.json()["detail"]


@pytest.mark.parametrize(
    "authorization",
    ["Bearer bk_unknown", "Bearer nothing-like-a-key", "Basic dXNlcjpwYXNz", "Bearer"],
)
def test_an_unknown_key_or_scheme_answers_401(client, authorization) -> None:
    response = client.get("/_billing/usage", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert "`billing keys create --tenant TENANT" in response.json()["detail"]


def test_keys_are_stored_hashed_and_shown_once(session) -> None:
    key, plaintext = create_key(session, tenant_id="A", scopes=["billing.read"], name="ci")
    stored = session.execute(select(ApiKey)).scalar_one()
    assert plaintext.startswith("bk_")
    assert len(plaintext) > 40
    assert stored.key_hash == hash_key(plaintext) != plaintext
    assert plaintext not in {stored.key_hash, stored.prefix, stored.name}
    assert plaintext.startswith(stored.prefix)


@pytest.mark.parametrize(
    ("tenant", "scopes"), [("A", []), ("A", ["billing.root"]), ("", ["billing.read"])]
)
def test_keys_need_a_tenant_and_known_scopes(session, tenant, scopes) -> None:
    with pytest.raises(InvalidUsageError):
        create_key(session, tenant_id=tenant, scopes=scopes)


def test_a_revoked_key_answers_401(client, a_key, session_factory) -> None:
    assert client.get("/_billing/usage", headers=a_key).status_code == 200
    with session_factory.begin() as session:
        key_id = session.execute(select(ApiKey.id)).scalar_one()
        revoke_key(session, key_id)
    assert client.get("/_billing/usage", headers=a_key).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "scope"),
    [
        ("GET", "/_billing/usage", None, "billing.read"),
        ("GET", "/_billing/invoices", None, "billing.read"),
        ("GET", "/_billing/quotas", None, "billing.read"),
        ("POST", "/_billing/usage", USAGE, "billing.write"),
        ("POST", "/_billing/usage/batch", {"events": [USAGE]}, "billing.write"),
        ("POST", "/_billing/plans", {"key": "p", "name": "P"}, "billing.admin"),
        ("POST", "/_billing/subscriptions", {"tenant_id": "A", "plan_key": "p"}, "billing.admin"),
    ],
)
def test_a_key_without_the_route_s_scope_answers_403(
    client, make_key, method, path, body, scope
) -> None:
    others = tuple(s for s in ("billing.read", "billing.write") if s != scope)
    response = client.request(method, path, json=body, headers=make_key("A", others))
    assert response.status_code == 403
    assert response.json()["scope"] == scope


def test_an_app_can_plug_in_its_own_principal(session_factory) -> None:
    def from_gateway(x_tenant: str = Header()) -> Principal:
        return Principal(tenant_id=x_tenant, scopes=frozenset({"billing.write"}))

    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, principal=from_gateway)
    with TestClient(app) as client:
        response = client.post("/_billing/usage", json=USAGE, headers={"X-Tenant": "gw"})
        assert response.status_code == 202
        assert client.post("/_billing/usage", json=USAGE).status_code == 422
    with session_factory() as session:
        from billing.models import UsageEvent

        assert session.execute(select(UsageEvent.tenant_id)).scalar_one() == "gw"


def test_a_different_prefix_moves_the_routes(session_factory, make_key) -> None:
    app = FastAPI()
    add_billing(app, session_factory=session_factory, prefix="/billing/v1/")
    with TestClient(app) as client:
        headers = make_key("A")
        assert client.get("/billing/v1/usage", headers=headers).status_code == 200
        assert client.get("/_billing/usage", headers=headers).status_code == 404
