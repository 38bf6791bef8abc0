"""RFC 9457 problem details: every error of the API as `application/problem+json`.

`register_error_handlers(app)` maps request validation errors (422, or 400 for a body that is
not JSON), HTTP errors, the billing error tree, database rejections of a value (400) and any
unexpected exception (500, without internals) to a problem document:

    {"type": "urn:billing:problem:validation", "title": "Invalid request", "status": 422,
     "detail": "amount: Input should be greater than or equal to 0", "field": "amount",
     "errors": [{"field": "amount", "in": "body", "detail": "..."}]}
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DataError, IntegrityError
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from billing.errors import (
    BillingError,
    CreditExceedsInvoiceError,
    CurrencyMismatchError,
    IdempotencyConflictError,
    InvalidCreditNoteError,
    InvalidPeriodError,
    InvalidSubscriptionError,
    InvalidTimezoneError,
    InvalidUsageError,
    InvoiceStateError,
    MeterDefinitionError,
    PeriodClosedError,
    PriceDefinitionError,
    ProviderSyncError,
    QuotaExceededError,
    SubscriptionConflictError,
    TimezoneLockedError,
    TooManyMetricsError,
    UnknownInvoiceError,
)
from webhooks.safetext import safe_text

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]
TYPE_PREFIX = "urn:billing:problem:"


class FieldError(BaseModel):
    """One invalid input: where it is and what is wrong with it."""

    field: str
    location: str
    detail: str


class Problem(BaseModel):
    """An RFC 9457 problem document (extension members allowed)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    field: str | None = None
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raise to answer with a problem document (status, title, detail, headers, extensions)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        slug: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = f"{TYPE_PREFIX}{slug}" if slug else "about:blank"
        self.headers = dict(headers or {})
        self.extensions = extensions


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type_: str = "about:blank",
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A problem+json response; None-valued extensions are left out."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    body.update({k: v for k, v in extensions.items() if v is not None})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem documents for `statuses`."""
    return {
        status: {
            "model": Problem,
            "description": _TITLES.get(status, "Error"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


def invalid_field(field: str, detail: str, *, location: str = "body") -> ProblemError:
    """The 422 problem for one bad input, named by `field`."""
    return ProblemError(
        422,
        "Invalid request",
        f"{field}: {detail}",
        slug="validation",
        field=field,
        errors=[{"field": field, "location": location, "detail": detail}],
    )


def register_error_handlers(app: FastAPI) -> None:
    """Answer every error raised while handling a request with a problem document."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(HTTPException, _on_http)
    app.add_exception_handler(BillingError, _on_billing)
    app.add_exception_handler(DataError, _on_data)
    app.add_exception_handler(IntegrityError, _on_integrity)
    app.add_exception_handler(Exception, _on_unexpected)


def field_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    """Pydantic/FastAPI error dicts as `{field, location, detail}`; `location` is body, query…"""
    result = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        location = loc[0] if loc and loc[0] in ("body", "query", "path", "header") else "body"
        parts = loc[1:] if loc and loc[0] == location else loc
        result.append(
            {"field": ".".join(parts) or location, "location": location, "detail": error["msg"]}
        )
    return result


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Quota exceeded",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        exc.status,
        exc.title,
        exc.detail,
        type_=exc.type,
        headers=exc.headers,
        **exc.extensions,
    )


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(error.get("type") == "json_invalid" for error in raw):
        return problem_response(
            400,
            "Malformed request body",
            "the request body is not valid JSON",
            type_=f"{TYPE_PREFIX}malformed-body",
        )
    errors = field_errors(raw)
    first = errors[0] if errors else {"field": "body", "detail": "invalid request"}
    return problem_response(
        422,
        "Invalid request",
        f"{first['field']}: {first['detail']}",
        type_=f"{TYPE_PREFIX}validation",
        field=first["field"],
        errors=errors,
    )


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request, headers.get("Allow"))
    # A 413 is always the body limit's (`billing.api.bodies.BodyTooLarge`, raised as FastAPI
    # reads a chunked body): the same type as the middlewares' own 413s.
    type_ = f"{TYPE_PREFIX}body-too-large" if exc.status_code == 413 else "about:blank"
    return problem_response(
        exc.status_code,
        _TITLES.get(exc.status_code, "Error"),
        detail,
        type_=type_,
        headers=headers,
    )


def _allowed_methods(request: Request, first_route: str | None) -> str:
    """Every method served at the request's path: Starlette's `Allow` names those of the first
    route matching the path only (`POST` for `/usage`, which takes `GET` too), so add those of
    every path of the OpenAPI document that matches the route path (without the root path)."""
    methods = {m.strip() for m in (first_route or "").split(",") if m.strip()}
    path = get_route_path(request.scope)
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {m.upper() for m in operations if m.upper() in _HTTP_METHODS}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


async def _on_billing(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BillingError)
    status, slug, title, extensions = _billing_problem(exc)
    return problem_response(status, title, str(exc), type_=f"{TYPE_PREFIX}{slug}", **extensions)


def _billing_problem(exc: BillingError) -> tuple[int, str, str, dict[str, Any]]:
    if isinstance(exc, InvalidUsageError):
        return 422, "invalid-usage", "Invalid usage", {"field": exc.field}
    if isinstance(exc, PriceDefinitionError):
        return 422, "invalid-price", "Invalid price", {"field": exc.field}
    if isinstance(exc, SubscriptionConflictError):
        return (
            409,
            "subscription-conflict",
            "Subscription conflict",
            {"existing_id": exc.existing_id},
        )
    if isinstance(exc, InvalidSubscriptionError):
        return 422, "invalid-subscription", "Invalid subscription", {"field": exc.field}
    if isinstance(exc, MeterDefinitionError):
        return 422, "invalid-meter", "Invalid meter", {"field": exc.field}
    if isinstance(exc, InvalidTimezoneError):
        return 422, "invalid-timezone", "Unknown time zone", {"field": exc.field}
    if isinstance(exc, TimezoneLockedError):
        return 409, "timezone-locked", "Time zone locked", {"invoice_id": exc.invoice_id}
    if isinstance(exc, IdempotencyConflictError):
        return (
            409,
            "idempotency-conflict",
            "Idempotency key reused",
            {"existing_id": exc.existing_id},
        )
    if isinstance(exc, InvalidPeriodError):
        return 422, "invalid-period", "Invalid period", {}
    if isinstance(exc, PeriodClosedError):
        return 409, "period-closed", "Period closed", closed_period_members(exc)
    if isinstance(exc, InvalidCreditNoteError):
        return 422, "invalid-credit-note", "Invalid credit note", {"field": exc.field}
    if isinstance(exc, CreditExceedsInvoiceError):
        return (
            409,
            "credit-exceeds-invoice",
            "Credit exceeds the invoice",
            {"available": exc.available},
        )
    if isinstance(exc, InvoiceStateError):
        return 409, "invoice-state", "Invoice state forbids this", {"invoice_status": exc.status}
    if isinstance(exc, UnknownInvoiceError):
        return 404, "not-found", "Not found", {}
    if isinstance(exc, CurrencyMismatchError):
        return 422, "currency-mismatch", "Currency mismatch", {"field": "currency"}
    if isinstance(exc, TooManyMetricsError):
        return 422, "too-many-metrics", "Too many metrics", {"limit": exc.limit}
    if isinstance(exc, QuotaExceededError):
        return 429, "quota-exceeded", "Quota exceeded", {}
    if isinstance(exc, ProviderSyncError):
        return 502, "provider-sync", "Payment provider sync failed", {"invoice_id": exc.invoice_id}
    return 400, "billing", "Billing error", {}


def closed_period_members(exc: PeriodClosedError) -> dict[str, Any]:
    """The problem members that name the closed period of a `PeriodClosedError`."""
    return {
        "period_start": exc.period_start.isoformat(),
        "period_end": exc.period_end.isoformat(),
    }


def _database_refusal(status: int, title: str, detail: str, slug: str, logged: str) -> Handler:
    """A handler answering a database's refusal with a fixed problem, logged at INFO."""

    async def on_refusal(request: Request, exc: Exception) -> JSONResponse:
        logger.info("%s: %s", logged, safe_text(str(exc)))  # it may quote the input
        return problem_response(status, title, detail, type_=f"{TYPE_PREFIX}{slug}")

    return on_refusal


# The database refused a value (out of range, bad encoding…): the input's fault.
_on_data = _database_refusal(
    400,
    "Value not storable",
    "a value in the request cannot be stored (out of range or malformed)",
    "unstorable-value",
    "database rejected a value",
)
# A constraint refused the write (a concurrent duplicate, a counter that would overflow).
_on_integrity = _database_refusal(
    409,
    "Conflict",
    "the request conflicts with data already stored",
    "conflict",
    "database constraint refused a write",
)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The path is percent-decoded: `%1b` is an ESC that would reach the log raw.
    logger.exception("unhandled error on %s %s", request.method, safe_text(request.url.path))
    return problem_response(500, "Internal server error")
