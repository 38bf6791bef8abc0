"""A small, fast HTTP/1.1 subscriber for `bench_webhooks.py` (asyncio, keep-alive, no framework).

`python bench/webhook_receiver.py PORT SECRET`: every POST is verified with `webhooks.verify`
and its `webhook-id` recorded with the arrival time; `GET /count` answers how many arrived,
`GET /dump` returns `[[id, unix_time], ...]` and forgets them. Unverifiable POSTs get 400.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from webhooks import WebhookVerificationError, verify

NO_CONTENT = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"


class Subscriber(asyncio.Protocol):
    received: list[tuple[str, float]] = []
    rejected = 0
    secret = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self.handle(head[0].split(" "), headers, body))

    def handle(self, request_line: list[str], headers: dict[str, str], body: bytes) -> bytes:
        method, path = request_line[0], request_line[1]
        if method == "GET":
            payload: object
            if path == "/dump":
                payload, Subscriber.received = Subscriber.received, []
            else:
                payload = {"count": len(Subscriber.received), "rejected": Subscriber.rejected}
            data = json.dumps(payload).encode()
            return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
        try:
            verify(body, headers, Subscriber.secret)
        except WebhookVerificationError:
            Subscriber.rejected += 1
            return BAD_REQUEST
        Subscriber.received.append((headers["webhook-id"], time.time()))
        return NO_CONTENT


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Subscriber, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    Subscriber.secret = sys.argv[2]
    asyncio.run(serve(int(sys.argv[1])))
