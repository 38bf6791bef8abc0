"""A total deadline per delivery attempt, enforced on every socket operation.

httpx's timeouts bound each operation (connect, one read, one write), so an endpoint that drips
a byte every few seconds keeps one request alive for as long as it likes. `attempt_deadline`
sets a deadline for the current thread's request, and `DeadlineStream` (which the guarded
network backend wraps around every connection) gives each read, write, connect and TLS
handshake at most the time left, failing with a timeout once it has passed: connecting, sending,
the headers and the body together take no longer than the deadline. Name resolution is bounded
by it too (`webhooks.ssrf.resolve_within`: the resolver runs in a thread of its own).
"""

from __future__ import annotations

import contextvars
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpcore

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "webhook_attempt_deadline", default=None
)


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Bound every socket operation of this thread's requests to `seconds` from now, in all."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left(timeout: float | None) -> float | None:
    """`timeout` shortened to the time left before the deadline, if one is set.

    Raises:
        httpcore.ReadTimeout: the deadline has passed.
    """
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the attempt's total deadline passed")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose operations end by the current attempt's deadline.

    Writes are held until the next read: httpcore writes a request's headers and its body
    apart, and each write is a segment the kernel carries through TCP (on loopback, through
    the receiving side too, in the writer's CPU time); held, a request is one. A write that
    fails as the request is sent leaves the answer to be read, as httpcore does (a server
    may close early and still answer).
    """

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._unsent: list[bytes] = []

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._unsent:
            unsent, self._unsent = b"".join(self._unsent), []
            with suppress(httpcore.WriteError):
                self._stream.write(unsent, time_left(timeout))
        return self._stream.read(max_bytes, time_left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        time_left(timeout)  # past the deadline, no more is sent
        if buffer:
            self._unsent.append(buffer)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, time_left(timeout))
        return DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)
