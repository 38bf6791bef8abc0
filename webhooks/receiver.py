"""The receiver's side: a FastAPI dependency that verifies deliveries and drops repeats.

```python
from fastapi import Depends, FastAPI
from webhooks.receiver import ReceivedWebhook, RedisDedupeStore, webhook_receiver

receive = webhook_receiver(secret, dedupe=RedisDedupeStore(redis.Redis.from_url(url)))

@app.post("/hooks/billing")
def billing_hook(event: Annotated[ReceivedWebhook, Depends(receive)]) -> dict[str, bool]:
    handle(event.type, event.data)
    return {"ok": True}
```

A delivery that fails verification gets 400 (`application/problem+json` once
`add_problem_handler(app)` is called); a `webhook-id` seen before gets 200 without reaching the
endpoint, so the sender stops retrying. If the endpoint raises, the id is forgotten again so the
sender's retry is processed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from webhooks.errors import WebhookVerificationError
from webhooks.signing import DEFAULT_TOLERANCE, verify

PROBLEM_MEDIA_TYPE = "application/problem+json"
DEFAULT_DEDUPE_TTL = timedelta(days=7)

Secrets = str | Sequence[str] | Callable[[], Sequence[str]]


class DedupeStore(Protocol):
    """Remembers which `webhook-id`s were received, for a while."""

    def first_time(self, event_id: str) -> bool:
        """Record `event_id` as seen; True if it had not been seen (atomic)."""
        ...

    def forget(self, event_id: str) -> None:
        """Drop `event_id`, so its next delivery is processed."""
        ...


class MemoryDedupeStore:
    """Seen ids in this process's memory, each kept for `ttl` (tests, one-process receivers)."""

    def __init__(
        self, ttl: timedelta = DEFAULT_DEDUPE_TTL, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl.total_seconds()
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_time(self, event_id: str) -> bool:
        """Record `event_id`; True if it was not already held."""
        now = self._clock()
        with self._lock:
            expires = self._seen.get(event_id)
            if expires is not None and expires > now:
                return False
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            self._seen[event_id] = now + self._ttl
            return True

    def forget(self, event_id: str) -> None:
        """Drop `event_id`."""
        with self._lock:
            self._seen.pop(event_id, None)


class RedisDedupeStore:
    """Seen ids in Redis: `SET key 1 NX EX ttl`, shared by every receiver process."""

    def __init__(
        self, client: Any, *, prefix: str = "webhooks:seen:", ttl: timedelta = DEFAULT_DEDUPE_TTL
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl = max(1, int(ttl.total_seconds()))

    def first_time(self, event_id: str) -> bool:
        """Record `event_id`; True if Redis did not hold it."""
        return bool(self._client.set(self._prefix + event_id, b"1", nx=True, ex=self._ttl))

    def forget(self, event_id: str) -> None:
        """Drop `event_id`."""
        self._client.delete(self._prefix + event_id)


@dataclass(frozen=True)
class ReceivedWebhook:
    """A verified delivery: its id, the event's topic, time and payload."""

    id: str
    type: str | None
    timestamp: str | None
    data: Any
    body: dict[str, Any]


class WebhookRejected(HTTPException):
    """A delivery failed verification (400)."""


class DuplicateWebhook(HTTPException):
    """A delivery whose `webhook-id` was already received (answered 200, not processed)."""


def webhook_receiver(
    secrets: Secrets,
    *,
    dedupe: DedupeStore | None = None,
    tolerance: timedelta = DEFAULT_TOLERANCE,
) -> Callable[[Request], AsyncIterator[ReceivedWebhook]]:
    """A FastAPI dependency yielding the verified `ReceivedWebhook` of a request.

    `secrets` is a secret, several (while one rotates), or a callable returning them (read on
    each request). Without `dedupe` repeats are not dropped.
    """

    async def receive(request: Request) -> AsyncIterator[ReceivedWebhook]:
        body = await request.body()
        keys = secrets() if callable(secrets) else secrets
        try:
            parsed = verify(body, request.headers, keys, tolerance=tolerance)
        except WebhookVerificationError as error:
            raise WebhookRejected(400, f"webhook verification failed: {error}") from error
        event_id = request.headers["webhook-id"]
        if dedupe is not None and not await run_in_threadpool(dedupe.first_time, event_id):
            raise DuplicateWebhook(200, f"duplicate delivery {event_id} dropped")
        envelope = parsed if isinstance(parsed, dict) else {"data": parsed}
        try:
            yield ReceivedWebhook(
                id=event_id,
                type=envelope.get("type"),
                timestamp=envelope.get("timestamp"),
                data=envelope.get("data"),
                body=envelope,
            )
        except Exception:
            if dedupe is not None:
                await run_in_threadpool(dedupe.forget, event_id)
            raise

    return receive


def add_problem_handler(
    app: FastAPI, *, on_problem: Callable[[Request, HTTPException], None] | None = None
) -> None:
    """Answer rejected and duplicate deliveries with `application/problem+json`.

    `on_problem`, if given, is called with each such request and exception (to log them).
    """

    async def problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if on_problem is not None:
            on_problem(request, exc)
        title = "Duplicate webhook" if isinstance(exc, DuplicateWebhook) else "Invalid webhook"
        content = {"type": "about:blank", "title": title, "status": exc.status_code}
        content["detail"] = exc.detail
        return JSONResponse(content, status_code=exc.status_code, media_type=PROBLEM_MEDIA_TYPE)

    app.add_exception_handler(WebhookRejected, problem)
    app.add_exception_handler(DuplicateWebhook, problem)
