"""The SSRF guard refuses private, loopback and link-local destinations unless allowed."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import pytest

from webhooks.delivery import ClaimedDelivery, Sender, make_client
from webhooks.errors import DestinationNotAllowedError
from webhooks.ssrf import AddressPolicy, GuardedBackend, allowed_addresses

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


def test_private_networks_can_be_allowed_and_imply_loopback() -> None:
    policy = AddressPolicy(allow_private_networks=True)
    assert policy.allows(ipaddress.ip_address("10.0.0.1"))
    assert policy.allows(ipaddress.ip_address("127.0.0.1"))
    assert policy.allows(ipaddress.ip_address("::1"))


EVERYTHING = AddressPolicy(allow_loopback=True, allow_private_networks=True)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "fe80::1",
        "fd00:ec2::254",
        "100.100.100.200",
        "224.0.0.1",
        "ff02::1",
        "ff0e::1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
    ],
)
def test_multicast_link_local_and_metadata_addresses_are_never_allowed(address: str) -> None:
    refusal = EVERYTHING.refusal(ipaddress.ip_address(address))
    assert refusal is not None
    assert "no setting allows" in refusal


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
        ("::ffff:0:127.0.0.1", "127.0.0.1"),  # IPv4-translated
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64
        ("2002:7f00:1::1", "127.0.0.1"),  # 6to4
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::ffff:0:10.0.0.1", "10.0.0.1"),
        ("::10.0.0.1", "10.0.0.1"),
        ("64:ff9b::a00:1", "10.0.0.1"),
        ("2002:a00:1::1", "10.0.0.1"),
        ("2002:c0a8:101::1", "192.168.1.1"),
    ],
)
def test_an_embedded_ipv4_address_is_judged_as_itself(address: str, inner: str) -> None:
    outer, embedded = ipaddress.ip_address(address), ipaddress.ip_address(inner)
    assert not STRICT.allows(outer)
    for policy in (AddressPolicy(allow_loopback=True), EVERYTHING):
        assert policy.allows(outer) == policy.allows(embedded)


@pytest.mark.parametrize(
    "address", ["::ffff:8.8.8.8", "::ffff:0:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_an_embedded_public_ipv4_address_is_allowed(address: str) -> None:
    assert STRICT.allows(ipaddress.ip_address(address))


def test_a_teredo_address_is_judged_by_its_server_and_client() -> None:
    # Server 65.54.227.120, client 127.0.0.1 (stored inverted: 0x80ff:fffe).
    teredo = ipaddress.ip_address("2001:0:4136:e378:8000:63bf:80ff:fffe")
    assert isinstance(teredo, ipaddress.IPv6Address)
    assert teredo.teredo == (
        ipaddress.ip_address("65.54.227.120"),
        ipaddress.ip_address("127.0.0.1"),
    )
    assert not STRICT.allows(teredo)
    assert AddressPolicy(allow_loopback=True).allows(teredo)


def test_a_local_use_nat64_address_counts_as_a_private_network() -> None:
    address = ipaddress.ip_address("64:ff9b:1::808:808")
    assert not AddressPolicy(allow_loopback=True).allows(address)
    assert EVERYTHING.allows(address)


@pytest.mark.parametrize(
    ("address", "setting"),
    [
        ("127.0.0.1", "WEBHOOKS_ALLOW_LOOPBACK=true"),
        ("::ffff:127.0.0.1", "WEBHOOKS_ALLOW_LOOPBACK=true"),
        ("10.0.0.1", "WEBHOOKS_ALLOW_PRIVATE_NETWORKS=true"),
    ],
)
def test_a_refusal_names_the_setting_that_would_allow_it(address: str, setting: str) -> None:
    def resolver(host: str, port: int) -> list[str]:
        return [address]

    with pytest.raises(DestinationNotAllowedError, match=setting):
        allowed_addresses("internal.test", 443, STRICT, resolver)


def test_an_empty_dns_answer_is_refused() -> None:
    with pytest.raises(DestinationNotAllowedError, match="no address"):
        allowed_addresses("empty.test", 443, EVERYTHING, lambda host, port: [])


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
    assert "WEBHOOKS_ALLOW_LOOPBACK=true" in (outcome.error or "")
    assert outcome.refused
    assert Recorder.hits == []


def test_the_connection_goes_to_the_checked_address_not_the_host_name(local_server) -> None:
    # `rebind.invalid` resolves only through the guard's resolver: connecting to the name again
    # (where a second DNS answer could differ from the checked one) would fail.
    port = int(local_server.rsplit(":", 1)[1].split("/")[0])
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    backend = GuardedBackend(AddressPolicy(allow_loopback=True), resolver)
    pool = httpcore.ConnectionPool(network_backend=backend)
    with pool:
        response = pool.request("POST", f"http://rebind.invalid:{port}/hook", content=b"{}")
    assert response.status == 204
    assert resolved == ["rebind.invalid"]
    assert Recorder.hits == ["/hook"]


def test_the_real_client_delivers_to_loopback_when_allowed(local_server) -> None:
    policy = AddressPolicy(allow_loopback=True)
    client = make_client(policy=policy, connect_timeout=1, read_timeout=1, max_connections=2)
    with client:
        outcome = Sender(client, user_agent="t").send(delivery(local_server))
    assert outcome.status_code == 204
    assert Recorder.hits == ["/hook"]
