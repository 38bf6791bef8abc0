"""Who is calling: a `Principal` (tenant and scopes), from an API key by default.

Every route takes the tenant from the principal, never from a header or a body field. An app
with its own authentication passes `add_billing(app, principal=my_dependency)`: any FastAPI
dependency returning a `Principal`, used for the billing routes and for `require_quota` alike.

Scopes are independent: `billing.read` reads, `billing.write` records usage, `billing.admin`
manages plans, prices, subscriptions and invoices. Plans and prices are shared by all tenants,
so give `billing.admin` to operators only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from billing.api.deps import SessionDep
from billing.api.keys import find_active_key
from billing.api.problems import ProblemError

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="API key",
    description="An API key from `billing keys create`: `Authorization: Bearer bk_…`",
)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: the tenant it acts for and the scopes it holds."""

    tenant_id: str
    scopes: frozenset[str]
    key_id: str | None = None


def get_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    session: SessionDep,
) -> Principal:
    """The principal of the request's API key (replaced by `add_billing(principal=...)`).

    Raises:
        ProblemError: 401 without a bearer key, or with an unknown or revoked one.
    """
    if credentials is None:
        raise ProblemError(
            401,
            "Unauthorized",
            "send an API key: Authorization: Bearer <key>",
            slug="unauthenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = find_active_key(session, credentials.credentials)
    if key is None:
        raise ProblemError(
            401,
            "Unauthorized",
            "the API key is unknown or revoked",
            slug="unauthenticated",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return Principal(tenant_id=key.tenant_id, scopes=frozenset(key.scopes), key_id=key.id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency returning the principal if it holds `scope`, else answering 403."""

    async def principal_with_scope(principal: PrincipalDep) -> Principal:
        if scope not in principal.scopes:
            raise ProblemError(
                403,
                "Forbidden",
                f"this key lacks the {scope} scope",
                slug="missing-scope",
                scope=scope,
            )
        return principal

    principal_with_scope.__name__ = f"require_{scope.replace('.', '_')}"
    return principal_with_scope


Reader = Annotated[Principal, Depends(require_scope("billing.read"))]
Writer = Annotated[Principal, Depends(require_scope("billing.write"))]
Admin = Annotated[Principal, Depends(require_scope("billing.admin"))]
