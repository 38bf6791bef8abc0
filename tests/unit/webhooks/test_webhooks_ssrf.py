"""The SSRF guard refuses private, loopback and link-local destinations unless allowed."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from webhooks.delivery import ClaimedDelivery, Sender, make_client
from webhooks.errors import DestinationNotAllowedError
from webhooks.ssrf import AddressPolicy, allowed_addresses

STRICT = AddressPolicy()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "fe80::1",
        "fc00::1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "100.64.0.1",
    ],
)
def test_non_public_addresses_are_refused_by_default(address: str) -> None:
    assert not STRICT.allows(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert STRICT.allows(ipaddress.ip_address(address))


def test_loopback_can_be_allowed_alone() -> None:
    policy = AddressPolicy(allow_loopback=True)
    assert policy.allows(ipaddress.ip_address("127.0.0.1"))
    assert policy.allows(ipaddress.ip_address("::1"))
    assert not policy.allows(ipaddress.ip_address("10.0.0.1"))
    assert not policy.allows(ipaddress.ip_address("169.254.169.254"))


def test_private_networks_can_be_allowed() -> None:
    policy = AddressPolicy(allow_private_networks=True)
    assert policy.allows(ipaddress.ip_address("10.0.0.1"))
    assert policy.allows(ipaddress.ip_address("169.254.169.254"))


def test_a_host_with_any_refused_address_is_refused() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.1"]

    with pytest.raises(DestinationNotAllowedError, match="10.0.0.1"):
        allowed_addresses("mixed.test", 443, STRICT, resolver)


class Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self) -> None:
        self.hits.append(self.path)
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[str]:
    Recorder.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def delivery(url: str) -> ClaimedDelivery:
    return ClaimedDelivery("d", "e", "t.x", {}, datetime.now(UTC), "s", url, ("sekrit",), 1)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_real_client_does_not_connect_to_loopback_by_default(local_server, host) -> None:
    url = local_server.replace("127.0.0.1", host)
    client = make_client(policy=STRICT, connect_timeout=1, read_timeout=1, max_connections=2)
    with client:
        outcome = Sender(client, user_agent="t").send(delivery(url))
    assert outcome.status_code is None
    assert "destination not allowed" in (outcome.error or "")
    assert Recorder.hits == []


def test_the_real_client_delivers_to_loopback_when_allowed(local_server) -> None:
    policy = AddressPolicy(allow_loopback=True)
    client = make_client(policy=policy, connect_timeout=1, read_timeout=1, max_connections=2)
    with client:
        outcome = Sender(client, user_agent="t").send(delivery(local_server))
    assert outcome.status_code == 204
    assert Recorder.hits == ["/hook"]
