"""A chunked body with no Content-Length, sent to a real server: refused with 413 once it passes
the limit, long before the client has sent it all (the server does not read it whole), with
and without an Idempotency-Key."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

import pytest
from sqlalchemy.orm import sessionmaker

from billing.api.keys import create_key
from billing.api.settings import ApiSettings
from billing.app import create_app
from tests.processes import serve_app

CHUNK = b"x" * 65536
TOTAL = 200 * 1024 * 1024  # what the client would send: 200 MiB


def send_chunked(sock: socket.socket, head: bytes, sent: list[int], stop: threading.Event) -> None:
    """Send the head, then chunks until TOTAL, the server closes, or `stop`."""
    try:
        sock.sendall(head)
        while sent[0] < TOTAL and not stop.is_set():
            sock.sendall(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
            sent[0] += len(CHUNK)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed: what we expect


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_streamed_body_over_the_limit_is_refused_before_it_is_read_whole(
    sqlite_engine, idempotent
) -> None:
    factory = sessionmaker(sqlite_engine)
    with factory.begin() as session:
        _, plaintext = create_key(session, tenant_id="A", scopes=["billing.write"])
    settings = ApiSettings(max_request_bytes=1024 * 1024, max_batch_request_bytes=1024 * 1024)
    app = create_app(settings, session_factory=factory)
    head = (
        b"POST /_billing/usage/batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nAuthorization: Bearer " + plaintext.encode() + b"\r\n"
    )
    if idempotent:
        head += b"Idempotency-Key: big-1\r\n"
    head += b"\r\n"
    sent, stop = [0], threading.Event()
    with serve_app(app) as base:
        url = urlsplit(base)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sender = threading.Thread(target=send_chunked, args=(sock, head, sent, stop))
            sender.start()
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
            stop.set()
            sender.join(timeout=30)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"application/problem+json" in answer
    assert sent[0] < TOTAL // 4  # answered long before the body was all sent
