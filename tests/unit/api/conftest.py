"""An app wired as the seed's snippet does (with a fixed clock), and API keys per tenant."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from billing.api import IdempotencyMiddleware, add_billing, register_error_handlers, require_quota
from billing.api.keys import create_key

NOW = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
READ_WRITE = ("billing.read", "billing.write")
ADMIN = ("billing.admin",)


class Clock:
    """A settable clock: `clock()` returns `clock.now`."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def idempotency_store() -> dict:
    return {}


@pytest.fixture
def app(session_factory: sessionmaker[Session], clock: Clock, idempotency_store: dict) -> FastAPI:
    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store=idempotency_store)
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, clock=clock)

    @app.get("/reports", dependencies=[Depends(require_quota("reports", window="day"))])
    def reports() -> dict:
        return {"ok": True}

    @app.get(
        "/exports", dependencies=[Depends(require_quota("exports", window="month", soft=True))]
    )
    def exports() -> dict:
        return {"ok": True}

    @app.post("/generate", dependencies=[Depends(require_quota("tokens", consume=10))])
    def generate() -> dict:
        return {"ok": True}

    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def make_key(session_factory: sessionmaker[Session]) -> Callable[..., dict[str, str]]:
    """`make_key("A", scopes)` → the Authorization header of a new key of tenant A."""

    def make(tenant: str = "A", scopes: tuple[str, ...] = READ_WRITE) -> dict[str, str]:
        with session_factory.begin() as session:
            _, plaintext = create_key(session, tenant_id=tenant, scopes=scopes)
        return {"Authorization": f"Bearer {plaintext}"}

    return make


@pytest.fixture
def a_key(make_key) -> dict[str, str]:
    return make_key("A", READ_WRITE)


@pytest.fixture
def operator(session_factory: sessionmaker[Session]) -> dict[str, str]:
    """The Authorization header of an operator's key (no tenant, `billing.admin`)."""
    with session_factory.begin() as session:
        _, plaintext = create_key(session, operator=True, scopes=ADMIN)
    return {"Authorization": f"Bearer {plaintext}"}
