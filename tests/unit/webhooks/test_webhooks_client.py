"""The relay's HTTP client: the request an `httpx.Client` would send, nothing kept between
deliveries, and a request's bytes written at once."""

from __future__ import annotations

import base64
import gzip
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime

import httpcore
import httpx
import pytest

from webhooks.deadline import DeadlineStream, attempt_deadline
from webhooks.delivery import ClaimedDelivery, DeliveryClient, Sender, make_client
from webhooks.ssrf import AddressPolicy

URL = "https://subscriber.test/hook?tenant=t1"
HEADERS = {
    "webhook-id": "evt_1",
    "webhook-timestamp": "1700000000",
    "webhook-signature": "v1,c2lnbmVk",
    "content-type": "application/json",
    "user-agent": "ua/1",
}


def seen_by(send) -> httpx.Request:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(204)

    send(httpx.MockTransport(handler))
    [request] = requests
    return request


def test_a_post_is_the_request_an_httpx_client_sends() -> None:
    timeout = httpx.Timeout(7.0, connect=3.0)

    def by_client(transport: httpx.MockTransport) -> None:
        client = httpx.Client(transport=transport, timeout=timeout, follow_redirects=False)
        client.headers["Accept-Encoding"] = "identity"  # an answer as sent, not inflated
        client.post(URL, content=b'{"a":1}', headers=HEADERS)

    def by_delivery_client(transport: httpx.MockTransport) -> None:
        with DeliveryClient(transport, timeout).post(URL, b'{"a":1}', HEADERS) as response:
            assert response.status_code == 204

    expected, request = seen_by(by_client), seen_by(by_delivery_client)
    assert (request.method, request.url, request.content) == ("POST", URL, b'{"a":1}')
    assert request.headers.raw == expected.headers.raw
    assert request.extensions == expected.extensions == {"timeout": timeout.as_dict()}


def test_no_cookie_of_one_delivery_is_sent_with_the_next() -> None:
    cookies: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cookies.append(request.headers.get("cookie"))
        return httpx.Response(204, headers={"set-cookie": "session=of-tenant-1; Path=/"})

    client = DeliveryClient(httpx.MockTransport(handler))
    for _ in range(2):
        with client.post(URL, b"{}", HEADERS):
            pass
    assert cookies == [None, None]


class Body(httpx.SyncByteStream):
    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"busy"

    def close(self) -> None:
        self.closed = True


def test_the_answer_is_read_within_the_post_and_closed_after_it_read_or_not() -> None:
    body = Body()
    client = DeliveryClient(httpx.MockTransport(lambda _: httpx.Response(503, stream=body)))
    with client.post(URL, b"{}", HEADERS) as response:
        assert (response.status_code, response.request.url, body.closed) == (503, URL, False)
    assert body.closed
    with client.post(URL, b"{}", HEADERS) as response:
        assert response.read() == b"busy"


class Recorded(httpcore.NetworkStream):
    """A stream that records what is written and read, failing writes if told to."""

    def __init__(self, fail_writes: bool = False) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.fail_writes = fail_writes
        self.closed = False

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.fail_writes:
            raise httpcore.WriteError("connection reset by peer")
        self.calls.append(("write", buffer))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.calls.append(("read", b"HTTP/1.1 204 No Content\r\n\r\n"))
        return self.calls[-1][1]

    def close(self) -> None:
        self.closed = True


def test_a_requests_writes_go_out_together_when_its_answer_is_read() -> None:
    inner = Recorded()
    stream = DeadlineStream(inner)
    stream.write(b"POST /hook HTTP/1.1\r\n\r\n")
    stream.write(b"")
    stream.write(b'{"a":1}')
    assert inner.calls == []
    stream.read(65536)
    stream.read(65536)
    assert inner.calls == [
        ("write", b'POST /hook HTTP/1.1\r\n\r\n{"a":1}'),
        ("read", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("read", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ]


def test_a_request_that_cannot_be_written_still_has_its_answer_read() -> None:
    # As httpcore does: a server may answer (a 413, say) and close before taking the body.
    inner = Recorded(fail_writes=True)
    stream = DeadlineStream(inner)
    stream.write(b"POST /hook HTTP/1.1\r\n\r\n")
    assert stream.read(65536) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_a_closed_stream_sends_nothing_it_held() -> None:
    inner = Recorded()
    stream = DeadlineStream(inner)
    stream.write(b"POST /hook HTTP/1.1\r\n\r\n")
    stream.close()
    assert (inner.calls, inner.closed) == ([], True)


def test_nothing_more_is_written_past_the_attempts_deadline() -> None:
    inner = Recorded()
    stream = DeadlineStream(inner)
    with attempt_deadline(-1.0), pytest.raises(httpcore.ReadTimeout):
        stream.write(b"POST /hook HTTP/1.1\r\n\r\n")
    stream.read(65536)
    assert inner.calls == [("read", b"HTTP/1.1 204 No Content\r\n\r\n")]


def test_a_delivery_reaches_a_real_subscriber_in_one_segment() -> None:
    """End to end: the request's headers and body arrive in one read of the server's socket."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    first_reads: list[bytes] = []

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            first_reads.append(connection.recv(65536))
            connection.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    client = make_client(
        policy=AddressPolicy(allow_loopback=True),
        connect_timeout=5,
        read_timeout=5,
        max_connections=1,
    )
    with client, client.post(f"http://127.0.0.1:{port}/hook", b'{"a":1}', HEADERS) as response:
        assert response.status_code == 204
    thread.join(5)
    server.close()
    [received] = first_reads
    assert received.startswith(b"POST /hook HTTP/1.1\r\n")
    assert received.endswith(b'\r\n\r\n{"a":1}')


SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


class _Streamed(httpx.SyncByteStream):
    """An answer's body as a transport streams it (not read before the relay reads it)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self._body


def test_a_compressed_answer_is_not_inflated_and_none_is_asked_for() -> None:
    """A hostile subscriber's 16 KiB of gzip inflate to 16 MiB: the relay reads the answer as
    sent, so it holds kilobytes, and it asks for answers as they are (`identity`)."""
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding"))
        headers = {"content-encoding": "gzip"}
        return httpx.Response(400, headers=headers, stream=_Streamed(bomb))

    sender = Sender(DeliveryClient(httpx.MockTransport(handler)), user_agent="ua/1")
    delivery = ClaimedDelivery("d", "e", "t.x", {}, datetime.now(UTC), "s", URL, (SECRET,), 1)
    tracemalloc.start()
    try:
        outcome = sender.send(delivery)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert asked == ["identity"]
    assert outcome.status_code == 400
    assert outcome.error == "HTTP 400: (gzip-encoded answer not shown)"
    assert peak < 2 * 1024 * 1024
