"""Edges of the SSRF guard that mutation testing found unchecked: the exact refusals, scoped
addresses, what the resolver is asked, and what the guarded backend connects to and with."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import httpcore
import pytest

from webhooks.errors import DestinationNotAllowedError
from webhooks.ssrf import AddressPolicy, GuardedBackend, allowed_addresses, never_allowed, resolve

STRICT = AddressPolicy()
EVERYTHING = AddressPolicy(allow_loopback=True, allow_private_networks=True)
NEVER = ", which no setting allows"
LOOPBACK = "; set WEBHOOKS_ALLOW_LOOPBACK=true to allow it"
PRIVATE = "; set WEBHOOKS_ALLOW_PRIVATE_NETWORKS=true to allow it"


@pytest.mark.parametrize(
    ("policy", "address", "refusal"),
    [
        (EVERYTHING, "224.0.0.1", "a multicast address" + NEVER),
        (EVERYTHING, "ff02::1", "a multicast address" + NEVER),
        (EVERYTHING, "169.254.169.254", "a link-local or cloud metadata address" + NEVER),
        (EVERYTHING, "fd00:ec2::254", "a link-local or cloud metadata address" + NEVER),
        (
            EVERYTHING,
            "::ffff:169.254.169.254",
            "a link-local or cloud metadata address (169.254.169.254 inside ::ffff:a9fe:a9fe)"
            + NEVER,
        ),
        (
            EVERYTHING,
            "64:ff9b::e000:1",
            "a multicast address (224.0.0.1 inside 64:ff9b::e000:1)" + NEVER,
        ),
        (STRICT, "127.0.0.1", "a loopback address" + LOOPBACK),
        (STRICT, "0.0.0.0", "a loopback address" + LOOPBACK),
        (STRICT, "10.0.0.1", "a private or reserved address" + PRIVATE),
        (STRICT, "::ffff:10.0.0.1", "a private or reserved address" + PRIVATE),
        (AddressPolicy(allow_loopback=True), "fc00::1", "a private or reserved address" + PRIVATE),
        (STRICT, "64:ff9b:1::808:808", "a local-use NAT64 address" + PRIVATE),
    ],
)
def test_a_refusal_says_exactly_what_was_refused(
    policy: AddressPolicy, address: str, refusal: str
) -> None:
    assert policy.refusal(ipaddress.ip_address(address)) == refusal


def test_never_allowed_names_the_embedded_address_that_is_never_allowed() -> None:
    outer = ipaddress.ip_address("2002:a9fe:a9fe::1")  # 6to4 of 169.254.169.254
    assert never_allowed(outer) == (
        "a link-local or cloud metadata address (169.254.169.254 inside 2002:a9fe:a9fe::1)"
    )
    assert never_allowed(ipaddress.ip_address("::ffff:8.8.8.8")) is None


@pytest.mark.parametrize("address", ["fd00:ec2::254%eth0", "fe80::1%2", "ff02::1%eth0"])
def test_a_scoped_address_is_judged_without_its_zone(address: str) -> None:
    # `ipaddress` keeps the zone, and a zoned address is not equal to the bare one: the metadata
    # address with a zone would otherwise pass as a mere private one.
    with pytest.raises(DestinationNotAllowedError, match="which no setting allows"):
        allowed_addresses("zoned.test", 443, EVERYTHING, lambda host, port: [address])


def test_a_scoped_loopback_address_is_loopback() -> None:
    policy = AddressPolicy(allow_loopback=True)
    assert allowed_addresses("zoned.test", 80, policy, lambda h, p: ["::1%1"]) == ["::1%1"]


def test_the_resolver_is_asked_for_the_host_and_the_port() -> None:
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["93.184.215.14"]

    assert allowed_addresses("example.test", 8443, STRICT, resolver) == ["93.184.215.14"]
    assert asked == [("example.test", 8443)]


def test_a_resolver_failure_is_a_connect_error_naming_the_host() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(httpcore.ConnectError, match=r"^cannot resolve nowhere\.test: .*not known"):
        allowed_addresses("nowhere.test", 443, STRICT, resolver)


def test_resolve_returns_the_addresses_of_the_host_asked_for() -> None:
    assert resolve("192.0.2.7", 443) == ["192.0.2.7"]


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port listening on 127.0.0.2 only (not on the 127.0.0.1 a default would reach)."""
    server = socket.socket()
    server.bind(("127.0.0.2", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def test_the_backend_connects_to_the_checked_address_with_the_callers_settings(
    listener: int,
) -> None:
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.2"]

    backend = GuardedBackend(AddressPolicy(allow_loopback=True), resolver)
    stream = backend.connect_tcp(
        "svc.test",
        listener,
        timeout=2.5,
        local_address="127.0.0.3",
        socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)],
    )
    try:
        sock = stream.get_extra_info("socket")
        assert sock.getpeername() == ("127.0.0.2", listener)
        assert sock.getsockname()[0] == "127.0.0.3"
        assert sock.gettimeout() == 2.5
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    finally:
        stream.close()
    assert asked == [("svc.test", listener)]


def test_the_backend_tries_the_next_address_when_one_refuses(listener: int) -> None:
    addresses = ["127.0.0.4", "127.0.0.2", "127.0.0.5"]  # nothing listens on .4 and .5
    backend = GuardedBackend(EVERYTHING, lambda host, port: addresses)
    stream = backend.connect_tcp("svc.test", listener, timeout=2)
    try:
        assert stream.get_extra_info("socket").getpeername() == ("127.0.0.2", listener)
    finally:
        stream.close()


def test_the_backend_raises_the_last_connect_error_when_every_address_refuses(
    listener: int,
) -> None:
    backend = GuardedBackend(EVERYTHING, lambda host, port: ["127.0.0.4", "127.0.0.5"])
    with pytest.raises(httpcore.ConnectError):
        backend.connect_tcp("svc.test", listener, timeout=2)


def test_the_backend_refuses_before_connecting(listener: int) -> None:
    backend = GuardedBackend(STRICT, lambda host, port: ["127.0.0.2"])
    with pytest.raises(DestinationNotAllowedError, match="WEBHOOKS_ALLOW_LOOPBACK=true"):
        backend.connect_tcp("svc.test", listener, timeout=2)
