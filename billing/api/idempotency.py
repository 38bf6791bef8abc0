"""`IdempotencyMiddleware`: a POST retried with the same `Idempotency-Key` runs once.

For a request with the header (other requests pass straight through):

- the first one runs; its response is stored for `ttl` (24 h by default) and replayed, with
  `Idempotent-Replayed: true`, to any later request with the same key and the same body;
- the same key with another body: 409; the same key while the first is still running: 409
  (it is not run a second time);
- the key is scoped by caller and route, so tenant B reusing tenant A's key runs as B's own
  request. With `add_billing`'s API keys the caller is the key itself, looked up before
  anything is replayed: a revoked or unknown key is passed to the app (401), never replayed
  to, and `Bearer`/`bearer` spell one caller. Otherwise it is the `Authorization` header's
  credentials (scheme in any case), or what `principal=` returns.

Only responses of requests that ran are stored: 2xx, 404 and 409. A request refused before it
ran (400, 401, 403, 413, 415, 422, 429) or that failed (5xx) releases its key: the corrected
retry runs. So does a response over `max_stored_bytes` (64 KiB), and a body that did not arrive
whole (the client went away) is neither run nor stored. When the store does not answer (Redis
down), or the API key cannot be looked up (the database is down), the request gets 503 with
`Retry-After` and is not run. A claim that is never completed (the process died) expires after
`lock_ttl` (5 minutes).

Stores: `MemoryIdempotencyStore` (what `store={}` becomes; one process only) and
`RedisIdempotencyStore` (`redis.asyncio`, shared by every worker process).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.api.bodies import (
    DEFAULT_MAX_BATCH_REQUEST_BYTES,
    BodyIncomplete,
    BodyTooLarge,
    read_body,
    too_large,
)
from billing.api.deps import BillingApi
from billing.api.problems import TYPE_PREFIX, problem_response
from billing.errors import BillingError

logger = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(hours=24)
DEFAULT_LOCK_TTL = timedelta(minutes=5)
MAX_KEY_LENGTH = 255
DEFAULT_MAX_STORED_BYTES = 64 * 1024
STORED_STATUSES = frozenset({404, 409})  # besides 2xx: requests that ran and concluded
RETRY_AFTER_SECONDS = 5

CallerName = Callable[[Scope], "str | None | Awaitable[str | None]"]


class IdempotencyStoreUnavailable(BillingError):
    """The idempotency store does not answer (Redis down or timing out). Transient: the
    request was not run, retry it later."""


@dataclass
class IdempotentRecord:
    """What a store keeps per key: the claim, then the response (`status` None: running)."""

    fingerprint: str
    token: str
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""  # base64

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> IdempotentRecord:
        data = json.loads(raw)
        data["headers"] = [tuple(pair) for pair in data["headers"]]
        return cls(**data)


class IdempotencyStore(Protocol):
    """Where claims and responses live. `claim` must be atomic across every process served."""

    async def claim(
        self, key: str, record: IdempotentRecord, ttl: timedelta
    ) -> IdempotentRecord | None:
        """Store `record` under `key` unless the key is taken; None if stored, else the
        record already there."""

    async def complete(self, key: str, record: IdempotentRecord, ttl: timedelta) -> None:
        """Replace our claim (same token) with the finished `record`, kept for `ttl`."""

    async def release(self, key: str, token: str) -> None:
        """Drop our claim (same token) so the key can be used again."""


class MemoryIdempotencyStore:
    """A dict-backed store for one process (tests, a single worker). Expired keys are dropped
    as they are met and on every hundredth write."""

    def __init__(
        self,
        data: MutableMapping[str, Any] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data: MutableMapping[str, Any] = {} if data is None else data
        self.clock = clock
        self._writes = 0

    async def claim(
        self, key: str, record: IdempotentRecord, ttl: timedelta
    ) -> IdempotentRecord | None:
        current = self._get(key)
        if current is not None:
            return current
        self._put(key, record, ttl)
        return None

    async def complete(self, key: str, record: IdempotentRecord, ttl: timedelta) -> None:
        current = self._get(key)
        if current is None or current.token == record.token:
            self._put(key, record, ttl)

    async def release(self, key: str, token: str) -> None:
        current = self._get(key)
        if current is not None and current.token == token:
            del self.data[key]

    def _get(self, key: str) -> IdempotentRecord | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        expires_at, record = entry
        if expires_at <= self.clock():
            del self.data[key]
            return None
        return record  # type: ignore[no-any-return]

    def _put(self, key: str, record: IdempotentRecord, ttl: timedelta) -> None:
        now = self.clock()
        self.data[key] = (now + ttl.total_seconds(), record)
        self._writes += 1
        if self._writes % 100 == 0:
            for stale in [k for k, (expires, _) in self.data.items() if expires <= now]:
                del self.data[stale]


class RedisIdempotencyStore:
    """A store in Redis (`redis.asyncio.Redis`): `SET NX PX` to claim, keys expire by TTL."""

    def __init__(self, client: Redis, *, prefix: str = "billing:idempotency:") -> None:
        self.client = client
        self.prefix = prefix

    async def claim(
        self, key: str, record: IdempotentRecord, ttl: timedelta
    ) -> IdempotentRecord | None:
        name = self.prefix + key
        try:
            for _ in range(3):  # the holder may expire between our SET and GET: try again
                if await self.client.set(name, record.dumps(), nx=True, px=_ms(ttl)):
                    return None
                raw = await self.client.get(name)
                if raw is not None:
                    return IdempotentRecord.loads(raw)
        except RedisError as error:
            raise IdempotencyStoreUnavailable(f"Redis: {type(error).__name__}") from error
        raise IdempotencyStoreUnavailable(f"could not claim idempotency key {key!r}")

    async def complete(self, key: str, record: IdempotentRecord, ttl: timedelta) -> None:
        await self._if_ours(
            key, record.token, lambda pipe, name: pipe.set(name, record.dumps(), px=_ms(ttl))
        )

    async def release(self, key: str, token: str) -> None:
        await self._if_ours(key, token, lambda pipe, name: pipe.delete(name))

    async def _if_ours(self, key: str, token: str, write: Callable[[Any, str], Any]) -> None:
        name = self.prefix + key
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(name)
                raw = await pipe.get(name)
                if raw is not None and IdempotentRecord.loads(raw).token != token:
                    return  # our claim expired and another request holds the key now
                pipe.multi()  # type: ignore[no-untyped-call]
                write(pipe, name)
                await pipe.execute()
        except WatchError:
            return  # changed under us: it is someone else's now
        except RedisError as error:
            raise IdempotencyStoreUnavailable(f"Redis: {type(error).__name__}") from error


def authorization_principal(scope: Scope) -> str | None:
    """A digest of the request's `Authorization` credentials, the scheme in any case (so
    `Bearer k` and `bearer k` are one caller); None without the header."""
    scheme, credentials = _authorization(scope)
    if scheme is None:
        return None
    return hashlib.sha256(f"{scheme.lower()} {credentials}".encode("latin-1")).hexdigest()


def api_key_principal(api: BillingApi, scope: Scope) -> str | None:
    """The id of the active API key the request bears; None for no, an unknown or a revoked
    key (the app then answers 401 itself). Blocking: one indexed lookup, or `api.keys`' cache."""
    scheme, credentials = _authorization(scope)
    if scheme is None or scheme.lower() != "bearer" or not credentials:
        return None
    with api.session_factory() as session:
        key = api.keys.find(session, credentials)
        return None if key is None else f"api-key:{key.id}"


def _authorization(scope: Scope) -> tuple[str | None, str]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            return scheme, credentials.strip()
    return None, ""


class IdempotencyMiddleware:
    """Replays the stored response of a POST sent again with the same `Idempotency-Key`.

    `store`: an `IdempotencyStore`, or a dict (`store={}`) for an in-memory one. `principal`
    (plain or async) names the caller from the ASGI scope; by default the active API key of
    `add_billing`'s authentication, else the `Authorization` header's credentials. A request
    it can't name (None) is passed through untouched, since replaying one caller's response to
    another would leak it. Apps that authenticate otherwise (a cookie, a gateway header) pass a
    `principal` that names their callers. `max_body_bytes` bounds the body read (413 above),
    `max_stored_bytes` the response kept.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: IdempotencyStore | MutableMapping[str, Any] | None = None,
        ttl: timedelta = DEFAULT_TTL,
        lock_ttl: timedelta = DEFAULT_LOCK_TTL,
        methods: tuple[str, ...] = ("POST",),
        header: str = "Idempotency-Key",
        principal: CallerName | None = None,
        max_body_bytes: int = DEFAULT_MAX_BATCH_REQUEST_BYTES,
        max_stored_bytes: int = DEFAULT_MAX_STORED_BYTES,
    ) -> None:
        self.app = app
        if store is None or isinstance(store, MutableMapping):
            store = MemoryIdempotencyStore(store)
        self.store: IdempotencyStore = store
        self.ttl = ttl
        self.lock_ttl = lock_ttl
        self.methods = frozenset(m.upper() for m in methods)
        self.header = header.lower().encode("latin-1")
        self.principal = principal
        self.max_body_bytes = max_body_bytes
        self.max_stored_bytes = max_stored_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        raw_key = next((v for k, v in scope["headers"] if k == self.header), None)
        if raw_key is None:
            await self.app(scope, receive, send)
            return
        key = raw_key.decode("latin-1")
        if not key.strip() or len(key) > MAX_KEY_LENGTH:
            await _problem(
                400,
                "Invalid Idempotency-Key",
                "must be 1 to 255 characters",
                "idempotency-key-invalid",
                scope,
                receive,
                send,
            )
            return
        try:
            caller = await self._caller(scope)
        except SQLAlchemyError as error:  # the API key could not be looked up
            await _unavailable(f"database: {type(error).__name__}", scope, receive, send)
            return
        if caller is None:
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, scope, self.max_body_bytes)
        except BodyIncomplete:
            return  # the client is gone: a partial body is neither run nor stored
        except BodyTooLarge as error:  # ours, or the body-limit middleware's (a smaller limit)
            await too_large(error.limit)(scope, receive, send)
            return
        store_key = _digest(caller, scope["method"], scope["path"], key)
        fingerprint = _digest(scope.get("query_string", b"").decode("latin-1"), body.hex())
        claim = IdempotentRecord(fingerprint=fingerprint, token=secrets.token_hex(16))
        try:
            existing = await self.store.claim(store_key, claim, self.lock_ttl)
        except IdempotencyStoreUnavailable as error:
            await _unavailable(str(error), scope, receive, send)
            return
        if existing is not None:
            await self._answer_existing(existing, fingerprint, scope, receive, send)
            return
        await self._run(scope, body, receive, send, store_key, claim)

    async def _caller(self, scope: Scope) -> str | None:
        if self.principal is not None:
            named = self.principal(scope)
            return await named if inspect.isawaitable(named) else named
        api = getattr(getattr(scope.get("app"), "state", None), "billing_api", None)
        if isinstance(api, BillingApi) and api.api_keys:
            return await run_in_threadpool(api_key_principal, api, scope)
        return authorization_principal(scope)

    async def _answer_existing(
        self,
        existing: IdempotentRecord,
        fingerprint: str,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        if existing.fingerprint != fingerprint:
            await _problem(
                409,
                "Idempotency key reused",
                "this Idempotency-Key was used for a request with another body",
                "idempotency-key-reused",
                scope,
                receive,
                send,
            )
        elif existing.status is None:
            await _problem(
                409,
                "Request in progress",
                "a request with this Idempotency-Key is still being processed",
                "idempotency-in-progress",
                scope,
                receive,
                send,
            )
        else:
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in existing.headers]
            headers.append((b"idempotent-replayed", b"true"))
            await send(
                {"type": "http.response.start", "status": existing.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": base64.b64decode(existing.body)})

    async def _run(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
        store_key: str,
        claim: IdempotentRecord,
    ) -> None:
        started: dict[str, Any] = {}
        chunks: list[bytes] = []
        size = 0
        replayed = False

        async def receive_body() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def capture(message: Message) -> None:
            nonlocal size
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= self.max_stored_bytes:
                    chunks.append(chunk)
            await send(message)

        try:
            await self.app(scope, receive_body, capture)
        except BaseException:
            await self._settle(self.store.release(store_key, claim.token))
            raise
        status = started.get("status")
        if status is None or not _ran(status) or size > self.max_stored_bytes:
            await self._settle(self.store.release(store_key, claim.token))
            return
        done = IdempotentRecord(
            fingerprint=claim.fingerprint,
            token=claim.token,
            status=status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in started["headers"]],
            body=base64.b64encode(b"".join(chunks)).decode("ascii"),
        )
        await self._settle(self.store.complete(store_key, done, self.ttl))

    async def _settle(self, write: Awaitable[None]) -> None:
        """Complete or release a claim once the response is sent: a store gone by then costs
        a replay (the claim expires after `lock_ttl`), never the response."""
        try:
            await write
        except IdempotencyStoreUnavailable as error:
            logger.warning("idempotency store unavailable after a response: %s", error)


async def _unavailable(reason: str, scope: Scope, receive: Receive, send: Send) -> None:
    """503 with `Retry-After`: what idempotent requests need (the store, the key's lookup)
    does not answer; nothing was run."""
    logger.warning("idempotent request refused, a dependency is unavailable: %s", reason)
    response = problem_response(
        503,
        "Service unavailable",
        "idempotent requests cannot be served for a moment; retry later",
        type_=f"{TYPE_PREFIX}idempotency-unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
    await response(scope, receive, send)


async def _problem(
    status: int, title: str, detail: str, slug: str, scope: Scope, receive: Receive, send: Send
) -> None:
    response = problem_response(status, title, detail, type_=f"{TYPE_PREFIX}{slug}")
    await response(scope, receive, send)


def _ran(status: int) -> bool:
    """Whether a response is of a request that ran (and may be replayed)."""
    return 200 <= status < 300 or status in STORED_STATUSES


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _ms(ttl: timedelta) -> int:
    return max(1, int(ttl.total_seconds() * 1000))
