"""The `/_billing` HTTP API (FastAPI), its auth, idempotent requests and quota dependency.

    from fastapi import Depends, FastAPI
    from billing.api import IdempotencyMiddleware, add_billing, register_error_handlers
    from billing.api import require_quota

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, store={})
    register_error_handlers(app)
    add_billing(app, session_factory=Session)  # mounts under /_billing

Names are loaded on first use, so `billing.api.models` and `billing.api.keys` (used by the
`billing keys` command and by `billing.quotas`) import without FastAPI.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from billing.api.auth import Principal
    from billing.api.idempotency import (
        IdempotencyMiddleware,
        IdempotencyStore,
        MemoryIdempotencyStore,
        RedisIdempotencyStore,
    )
    from billing.api.problems import ProblemError, register_error_handlers
    from billing.api.ratelimit import require_quota
    from billing.api.setup import add_billing

_EXPORTS = {
    "IdempotencyMiddleware": "billing.api.idempotency",
    "IdempotencyStore": "billing.api.idempotency",
    "MemoryIdempotencyStore": "billing.api.idempotency",
    "Principal": "billing.api.auth",
    "ProblemError": "billing.api.problems",
    "RedisIdempotencyStore": "billing.api.idempotency",
    "add_billing": "billing.api.setup",
    "register_error_handlers": "billing.api.problems",
    "require_quota": "billing.api.ratelimit",
}

__all__ = [
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Principal",
    "ProblemError",
    "RedisIdempotencyStore",
    "add_billing",
    "register_error_handlers",
    "require_quota",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
