"""The relay's own pool (`make_client`) is posted to without httpx's request and response
objects: a real subscriber sees the same request, and each answer gives the same outcome, as
through httpx's transport; a read answer leaves its connection for the next delivery."""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from webhooks.delivery import ClaimedDelivery, DeliveryClient, Sender, make_client
from webhooks.policy import Outcome
from webhooks.ssrf import AddressPolicy

NOW = 1_700_000_000.0
SECRET = "whsec_a2tra2tra2tra2tra2tra2tra2tra2tr"


class Subscriber:
    """A loopback HTTP/1.1 server answering every request with `answer`, keeping each
    connection open; it records each request's bytes and counts connections."""

    def __init__(self) -> None:
        self.answer = b"HTTP/1.1 204 No Content\r\n\r\n"
        self.requests: list[bytes] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/hook?tenant=t1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):  # the relay may close before the end
            received = b""
            while True:
                head, _, rest = received.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(rest) >= length:
                    self.requests.append(head + b"\r\n\r\n" + rest[:length])
                    received = rest[length:]
                    connection.sendall(self.answer)
                    continue
                data = connection.recv(65536)
                if not data:
                    return
                received += data

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    server = Subscriber()
    yield server
    server.close()


def delivery(url: str) -> ClaimedDelivery:
    created = datetime(2026, 12, 3, tzinfo=UTC)
    return ClaimedDelivery("d1", "evt_1", "t.x", {"n": 1}, created, "s1", url, (SECRET,), 1)


def pooled() -> DeliveryClient:
    policy = AddressPolicy(allow_loopback=True)
    return make_client(policy=policy, connect_timeout=5, read_timeout=5, max_connections=2)


def send(client: DeliveryClient, url: str) -> Outcome:
    return Sender(client, user_agent="ua/1", clock=lambda: NOW).send(delivery(url))


def send_once(client: DeliveryClient, url: str) -> Outcome:
    with client:
        return send(client, url)


GZIPPED = gzip.compress(b"\0" * (1024 * 1024))
ANSWERS = {
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "200 with a body": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "503 retry later": (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 120\r\nContent-Length: 4\r\n\r\nbusy"
    ),
    "429 at a date": (
        b"HTTP/1.1 429 Too Many\r\nRetry-After: Tue, 14 Nov 2023 22:15:20 GMT\r\n"
        b"Content-Length: 0\r\n\r\n"
    ),
    "302": b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\nContent-Length: 0\r\n\r\n",
    "400 gzip": b"HTTP/1.1 400 Bad\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
    % (len(GZIPPED), GZIPPED),
    "500 chunked": (
        b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\n\xc3\xa9rror\r\n3\r\n \x1b[\r\n0\r\n\r\n"
    ),
    "500 of 1 MiB": b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s"
    % (1024 * 1024, b"x" * (1024 * 1024)),
}


@pytest.mark.parametrize("answer", ANSWERS.values(), ids=ANSWERS.keys())
def test_the_pool_gets_the_outcome_httpxs_transport_gets(subscriber, answer) -> None:
    subscriber.answer = answer
    through_httpx = send_once(DeliveryClient(httpx.HTTPTransport(trust_env=False)), subscriber.url)
    through_pool = send_once(pooled(), subscriber.url)
    assert through_pool == through_httpx
    first, second = subscriber.requests
    assert first == second
    assert first.startswith(b"POST /hook?tenant=t1 HTTP/1.1\r\nHost: 127.0.0.1:")


def test_a_read_answer_leaves_its_connection_to_the_next_delivery(subscriber) -> None:
    with pooled() as client:
        outcomes = [send(client, subscriber.url) for _ in range(3)]
    assert outcomes == [Outcome(status_code=204)] * 3
    assert subscriber.connections == 1


def test_an_answer_over_the_cap_is_cut_and_its_connection_closed(subscriber) -> None:
    subscriber.answer = ANSWERS["500 of 1 MiB"]
    with pooled() as client:
        outcomes = [send(client, subscriber.url) for _ in range(2)]
    assert outcomes == [Outcome(status_code=500, error="HTTP 500: " + "x" * 490)] * 2
    assert subscriber.connections == 2


def test_a_closed_subscriber_is_a_connect_error_as_through_httpx() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    through_httpx = send_once(DeliveryClient(httpx.HTTPTransport(trust_env=False)), url)
    through_pool = send_once(pooled(), url)
    assert through_pool == through_httpx
    assert (through_pool.error or "").startswith("ConnectError: ")
