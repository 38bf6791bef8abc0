"""Who is calling: a `Principal` (a tenant, or an operator, and scopes), from an API key.

Two kinds of caller:

- a **tenant** (a key bound to one tenant): `billing.read` reads its own usage, quotas,
  subscriptions and invoices (and the shared plans), `billing.write` records its usage. Every
  tenant route takes the tenant from the principal, never from a header or a body field.
- an **operator** (a key with no tenant, `billing keys create --operator`): `billing.admin`
  manages the shared catalogue (plans, prices, entitlements) and any tenant's subscriptions
  and invoices, the tenant named in the path or the body. Operators have no usage of their own.

A tenant-bound principal never acts as an operator, even if it holds `billing.admin` (older keys
did): a tenant can neither edit the catalogue every tenant is billed from, nor cancel its own
subscription to lift its quotas. An app with its own authentication passes
`add_billing(app, principal=my_dependency)`: any FastAPI dependency returning a `Principal`,
used for the billing routes and for `require_quota` alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from billing.api.deps import ApiDep, SessionDep
from billing.api.keys import ADMIN_SCOPE
from billing.api.problems import ProblemError

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="API key",
    description="An API key from `billing keys create`: `Authorization: Bearer bk_…`",
)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: the tenant it acts for (None for an operator) and the scopes it holds."""

    tenant_id: str | None
    scopes: frozenset[str]
    key_id: str | None = None

    @property
    def is_operator(self) -> bool:
        """True for a caller bound to no tenant."""
        return self.tenant_id is None


@dataclass(frozen=True, slots=True)
class TenantPrincipal:
    """A caller acting for one tenant (what tenant routes and `require_quota` receive)."""

    tenant_id: str
    scopes: frozenset[str]
    key_id: str | None = None


async def get_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    session: SessionDep,
    api: ApiDep,
) -> Principal:
    """The principal of the request's API key (replaced by `add_billing(principal=...)`).

    Async: a key the cache answers for costs no thread (see `KeyLookup.afind`).

    Raises:
        ProblemError: 401 without a bearer key, or with an unknown or revoked one.
    """
    if credentials is None:
        raise ProblemError(
            401,
            "Unauthorized",
            "send an API key: Authorization: Bearer <key>; an operator creates one with "
            "`billing keys create --tenant TENANT --scope billing.read`",
            slug="unauthenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = await api.keys.afind(session, credentials.credentials)
    if key is None:
        raise ProblemError(
            401,
            "Unauthorized",
            "the API key is unknown or revoked; an operator creates a new one with "
            "`billing keys create --tenant TENANT --scope billing.read`",
            slug="unauthenticated",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return Principal(tenant_id=key.tenant_id, scopes=key.scopes, key_id=key.id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def tenant_of(principal: Principal) -> TenantPrincipal:
    """The principal as a tenant's caller.

    Raises:
        ProblemError: 403 for an operator, which has no tenant of its own.
    """
    if principal.tenant_id is None:
        raise ProblemError(
            403,
            "Forbidden",
            "operator keys have no tenant: use a tenant's key here, or the operator routes "
            "that name the tenant (/tenants/{tenant_id}/…)",
            slug="operator-key",
        )
    return TenantPrincipal(principal.tenant_id, principal.scopes, principal.key_id)


def require_scope(scope: str) -> Callable[[Principal], Awaitable[TenantPrincipal]]:
    """A dependency returning the tenant principal if it holds `scope`, else answering 403."""

    async def tenant_with_scope(principal: PrincipalDep) -> TenantPrincipal:
        tenant = tenant_of(principal)
        _check_scope(principal, scope)
        return tenant

    tenant_with_scope.__name__ = f"require_{scope.replace('.', '_')}"
    return tenant_with_scope


async def require_operator(principal: PrincipalDep) -> Principal:
    """The principal if it is an operator holding `billing.admin`, else 403."""
    if not principal.is_operator:
        raise ProblemError(
            403,
            "Forbidden",
            f"{ADMIN_SCOPE} routes need an operator key (billing keys create --operator); "
            "tenant keys cannot change the shared catalogue or any subscription",
            slug="operator-only",
            scope=ADMIN_SCOPE,
        )
    _check_scope(principal, ADMIN_SCOPE)
    return principal


async def require_catalogue_reader(principal: PrincipalDep) -> Principal:
    """A tenant with `billing.read`, or an operator: the plans are shared by both."""
    _check_scope(principal, ADMIN_SCOPE if principal.is_operator else "billing.read")
    return principal


def _check_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise ProblemError(
            403, "Forbidden", f"this key lacks the {scope} scope", slug="missing-scope", scope=scope
        )


Reader = Annotated[TenantPrincipal, Depends(require_scope("billing.read"))]
Writer = Annotated[TenantPrincipal, Depends(require_scope("billing.write"))]
Operator = Annotated[Principal, Depends(require_operator)]
CatalogueReader = Annotated[Principal, Depends(require_catalogue_reader)]
