"""The relay's HTTP client: the request an `httpx.Client` would send, nothing kept between
deliveries."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from webhooks.delivery import DeliveryClient

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
