"""The web process (`web` in the Procfile): `uvicorn billing.app:app`.

The billing API under `/_billing`, idempotent POSTs (Redis when `REDIS_URL` is set, else in
memory), problem+json errors, `/healthz` (200 when the database answers, 503 otherwise) and
`/metrics` (Prometheus: the ledger's and webhooks' counters, summed over the machine's processes
when `PROMETHEUS_MULTIPROC_DIR` is set, as it must be for `uvicorn --workers N`; and the outbox
gauges, read from the database at each scrape; with `METRICS_TOKEN` set, only for requests
bearing it; with `METRICS_BIND` set, only on that address, never on the app's port). With
`REDIS_URL`, API keys are cached for `API_KEY_CACHE_TTL` under Redis's revocation marker
(`billing.api.keycache`): a revoked key is still refused on the next request.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, Response
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from billing.api import IdempotencyMiddleware, add_billing, register_error_handlers
from billing.api.idempotency import IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore
from billing.api.keycache import KeyLookup, RedisRevocationMarker
from billing.api.problems import problem_response
from billing.api.settings import ApiSettings
from billing.db import make_engine, make_session_factory
from billing.metrics import render, serve
from billing.settings import BillingSettings
from webhooks.logs import configure_logging
from webhooks.metrics import OutboxCollector
from webhooks.settings import WebhookSettings

logger = logging.getLogger(__name__)


def create_app(
    settings: ApiSettings | None = None,
    *,
    session_factory: sessionmaker[Session] | None = None,
    idempotency_store: IdempotencyStore | None = None,
) -> FastAPI:
    """The billing web app; `settings` default to the environment's."""
    settings = settings or ApiSettings()
    if session_factory is None:
        engine = make_engine(settings.database_url, echo=settings.sql_echo)
        session_factory = make_session_factory(engine)
    factory = session_factory
    own_store = _store(settings) if idempotency_store is None else None
    keys = _key_lookup(settings)

    outbox = OutboxCollector(factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop_metrics = _serve_metrics(settings.metrics_address, outbox)
        yield
        stop_metrics()
        if isinstance(own_store, RedisIdempotencyStore):
            await own_store.client.aclose()  # the client this app made
        if isinstance(keys.marker, RedisRevocationMarker):
            keys.marker.client.close()
            if keys.marker.async_client is not None:
                await keys.marker.async_client.aclose()

    app = FastAPI(title="billing-workers", version="0.1.0", lifespan=lifespan)
    app.add_middleware(
        IdempotencyMiddleware,
        store=idempotency_store or own_store,
        ttl=settings.idempotency_ttl,
        lock_ttl=settings.idempotency_lock_ttl,
        max_body_bytes=max(settings.max_request_bytes, settings.max_batch_request_bytes),
    )
    register_error_handlers(app)
    add_billing(
        app,
        session_factory=factory,
        prefix=settings.billing_prefix,
        max_request_bytes=settings.max_request_bytes,
        max_batch_request_bytes=settings.max_batch_request_bytes,
        usage_max_age=settings.usage_max_age,
        late_usage=settings.late_usage,
        keys=keys,
        max_metrics_per_tenant=settings.max_metrics_per_tenant,
        invoice_policy=BillingSettings().invoice_policy(),
    )

    @app.get("/healthz", tags=["health"], summary="200 when the database answers")
    def healthz() -> JSONResponse:
        try:
            with factory() as session:
                session.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return problem_response(503, "Service unavailable", "the database does not answer")
        return JSONResponse({"status": "ok"})

    if settings.metrics_address is None:  # else served on METRICS_BIND only
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""

        @app.get("/metrics", include_in_schema=False)
        def metrics(authorization: Annotated[str | None, Header()] = None) -> Response:
            if token and not _bears(authorization, token):
                return problem_response(
                    401,
                    "Unauthorized",
                    "send the METRICS_TOKEN: Authorization: Bearer <token>",
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
            body, content_type = render(outbox)
            return Response(body, media_type=content_type)

    return app


def _serve_metrics(address: tuple[str, int] | None, *collectors: Collector) -> Callable[[], None]:
    """Serve `/metrics` on `METRICS_BIND` from a thread of this process; return its stopper.

    A no-op when unset, or when the address is taken: under `uvicorn --workers N` the first
    process serves it (summing them all with `PROMETHEUS_MULTIPROC_DIR`), the others log why
    they don't.
    """
    if address is None:
        return lambda: None
    host, port = address
    try:
        stop = serve(port, host, *collectors)
    except OSError as error:
        logger.warning("METRICS_BIND %s:%d is not served by this process: %s", host, port, error)
        return lambda: None
    logger.info("metrics on http://%s:%d/metrics (METRICS_BIND)", host, port)
    return stop


def _bears(authorization: str | None, token: str) -> bool:
    """Whether the `Authorization` header is `Bearer <token>` (compared in constant time)."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.encode()
    )


def _key_lookup(settings: ApiSettings) -> KeyLookup:
    """API keys cached for `API_KEY_CACHE_TTL` when Redis holds the revocation marker."""
    if not settings.redis_url or settings.api_key_cache_ttl <= timedelta(0):
        return KeyLookup()
    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

    url = settings.redis_url
    marker = RedisRevocationMarker(
        Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5),
        namespace=settings.broker_namespace,
        # read on every request: awaited, with no trip through the thread pool
        async_client=AsyncRedis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5),
    )
    return KeyLookup(marker=marker, ttl=settings.api_key_cache_ttl)


def _store(settings: ApiSettings) -> IdempotencyStore:
    if settings.redis_url:
        from redis.asyncio import Redis

        return RedisIdempotencyStore(
            Redis.from_url(settings.redis_url), prefix=f"{settings.broker_namespace}:idempotency:"
        )
    return MemoryIdempotencyStore()


def _served() -> FastAPI:
    """`app` as `uvicorn billing.app:app` serves it: logging set up as in the other processes
    (`LOG_FORMAT`, `LOG_LEVEL`, untrusted text escaped), unless the process has set it up."""
    if not logging.getLogger().handlers:
        shared = WebhookSettings()  # LOG_FORMAT and LOG_LEVEL are every process's
        configure_logging(shared.log_format, shared.log_level)
    return create_app()


app = _served()
