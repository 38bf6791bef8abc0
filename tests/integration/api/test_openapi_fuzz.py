"""Schemathesis against the app's OpenAPI schema, on SQLite and PostgreSQL: never a 500, and
every response as the schema documents it.

Generated requests are sent with each of three valid keys (a tenant's reader and writer, and an
operator's, so that they reach every handler) and a random Idempotency-Key header where the
schema has none; positive and negative data both.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from billing.api.idempotency import MemoryIdempotencyStore
from billing.api.keys import create_key
from billing.api.settings import ApiSettings
from billing.app import create_app
from billing.models import Plan

pytestmark = pytest.mark.slow


KEYS = {
    "reader": {"tenant_id": "fuzz", "scopes": ["billing.read"]},
    "writer": {"tenant_id": "fuzz", "scopes": ["billing.write"]},
    "operator": {"operator": True, "scopes": ["billing.admin"]},
}


@pytest.fixture
def auth_headers(session_factory) -> list[dict[str, str]]:
    """The Authorization header of each kind of key; every case is sent with each."""
    with session_factory.begin() as session:
        plaintexts = [create_key(session, **KEYS[kind])[1] for kind in sorted(KEYS)]
        session.add(Plan(key="pro", name="Pro"))
    return [{"Authorization": f"Bearer {plaintext}"} for plaintext in plaintexts]


@pytest.fixture
def api_schema(session_factory):
    app = create_app(
        ApiSettings(), session_factory=session_factory, idempotency_store=MemoryIdempotencyStore()
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    allow_header_conformance,
]


# Every route, with the three keys, on both databases, split so each part has a timeout sized to
# it. The examples per route are few: the write part with 30 took 236 s on SQLite alone at load
# ~10 and 988 s at load 18 (the largest part of the suite); with 8 each route still gets positive
# and negative bodies (derandomized, so every run sends the same ones), and a deeper run is
# `FUZZ_EXAMPLES=30 python -m pytest tests/integration/api/test_openapi_fuzz.py`. Reads, with 4,
# passed 180 s at load 25 (4 test processes beside 7 other sessions): both parts have 600 s.
READ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "4"))
WRITE_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )


def call_with_every_key(case, auth_headers: list[dict[str, str]]) -> None:
    for headers in auth_headers:
        case.call_and_validate(headers=headers, checks=CHECKS)


@pytest.mark.timeout(600)
@schema.include(method="GET").parametrize()
@fuzz_settings(READ_EXAMPLES)
def test_no_read_makes_the_api_fail(case, auth_headers) -> None:
    call_with_every_key(case, auth_headers)


@pytest.mark.timeout(600)
@schema.exclude(method="GET").parametrize()
@fuzz_settings(WRITE_EXAMPLES)
def test_no_write_makes_the_api_fail(case, auth_headers) -> None:
    call_with_every_key(case, auth_headers)
