"""What a request body may be: JSON, and at most so many bytes.

`MAX_REQUEST_BYTES` (1 MiB by default) bounds every billing route's body and
`MAX_BATCH_REQUEST_BYTES` (4 MiB, about 4 KiB an event) the batch route's; a larger body is
refused with 413 problem+json before it is read whole: at once when `Content-Length` says so,
else as soon as the bytes received pass the limit (`BodyLimitMiddleware`, which `add_billing`
installs for the billing routes only). The idempotency middleware, which may read a body before
the routes do, stops at its own limit the same way (`read_body`).

A body that is not JSON (`Content-Type` other than `application/json` or `…+json`, or none) is
refused with 415 (`require_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from email.message import Message as MimeMessage

from fastapi import Request
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.api.problems import TYPE_PREFIX, ProblemError, problem_response

DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_REQUEST_BYTES = 4 * 1024 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(HTTPException):
    """The request's body is over the limit (`Content-Length` or the bytes received).

    An `HTTPException`, so that FastAPI lets it through while reading a body for a route, and
    the app's handler answers it (413 problem+json, see `register_error_handlers`).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {limit} bytes")
        self.limit = limit


class BodyIncomplete(Exception):
    """The client went away before its body arrived whole."""


def is_json(content_type: str | None) -> bool:
    """True for `application/json` and `application/…+json` (parameters allowed)."""
    if not content_type:
        return False
    message = MimeMessage()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def require_json(request: Request) -> None:
    """A router dependency: a request that has a body must say it is JSON, else 415."""
    if request.method not in BODY_METHODS or not _has_body(request):
        return
    if not is_json(request.headers.get("content-type")):
        raise ProblemError(
            415,
            "Unsupported media type",
            "send the body as JSON: Content-Type: application/json",
            slug="unsupported-media-type",
            headers={"Accept-Post": "application/json"},
        )


def content_length(scope: Scope) -> int | None:
    """The request's `Content-Length`, or None when absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    """The whole body, reading no more than `limit` bytes.

    Raises:
        BodyTooLarge: `Content-Length` or the bytes received are over `limit`.
        BodyIncomplete: the client disconnected before the last chunk.
    """
    declared = content_length(scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise BodyIncomplete
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class BodyLimitMiddleware:
    """Refuses, with 413, request bodies over the limit of their path, before reading them
    whole. Paths under `prefix` have `max_bytes` unless `overrides` names them; other paths
    (the host app's own routes) are left alone. The path is the route's, without the root path
    (`uvicorn --root-path`, or the app mounted under another)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        prefix: str,
        max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        overrides: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")
        self.max_bytes = max_bytes
        self.overrides = dict(overrides or {})

    def limit_for(self, path: str) -> int | None:
        """The body limit of `path`, None for a path outside the prefix."""
        if path in self.overrides:
            return self.overrides[path]
        if path == self.prefix or path.startswith(self.prefix + "/"):
            return self.max_bytes
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(get_route_path(scope)) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await too_large(limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await too_large(limit)(scope, receive, send)


def too_large(limit: int) -> ASGIApp:
    """The 413 problem response for a body over `limit` bytes."""
    return problem_response(
        413,
        "Request body too large",
        f"the request body is over {limit} bytes",
        type_=f"{TYPE_PREFIX}body-too-large",
    )


def _has_body(request: Request) -> bool:
    declared = content_length(request.scope)
    return declared != 0 if declared is not None else "transfer-encoding" in request.headers
