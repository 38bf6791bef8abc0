"""The SSRF guard: deliveries go to public addresses only, unless settings allow more.

The check runs where the relay opens each TCP connection (a network backend for httpcore), on
every address the host name resolves to, and the connection goes to the address that was
checked, so a DNS answer that changes between a check and the connect cannot slip through.

An IPv6 address that carries an IPv4 one (IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated
`::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo
`2001::/32`) is judged by the IPv4 address it reaches. The local-use NAT64 prefix
`64:ff9b:1::/48` embeds addresses in a site-specific layout, so it counts as a private network.
Multicast is never allowed; neither are link-local addresses (cloud metadata services live
there) nor the metadata addresses outside that range: no setting makes them deliverable.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore

from webhooks.deadline import DeadlineStream, time_left
from webhooks.errors import DestinationNotAllowedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_V4_IN_V6 = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated, still routed by some stacks)
)
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, layout chosen per site
#: Instance metadata services reachable outside the link-local ranges (AWS IPv6, Alibaba).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200")
)

#: The settings that would let a refused address through, named in the refusal.
LOOPBACK_SETTING = "WEBHOOKS_ALLOW_LOOPBACK=true"
PRIVATE_SETTING = "WEBHOOKS_ALLOW_PRIVATE_NETWORKS=true"


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a transition mechanism, if any."""
    if address in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")):
        return []
    for network in _V4_IN_V6:
        if address in network:
            return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # the Teredo server and the (de-obfuscated) client
    return []


def never_allowed(address: IPAddress) -> str | None:
    """Why no setting lets a delivery reach `address` (None if some setting may)."""
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local or address in METADATA_ADDRESSES:
        return "a link-local or cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        for inner in embedded_ipv4(address):
            reason = never_allowed(inner)
            if reason:
                return f"{reason} ({inner} inside {address})"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which non-public addresses a delivery may reach (`allow_private_networks` implies
    loopback)."""

    allow_loopback: bool = False
    allow_private_networks: bool = False

    def allows(self, address: IPAddress) -> bool:
        """True if a connection to `address` is allowed."""
        return self.refusal(address) is None

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` is refused, naming the setting that would allow it; None if allowed."""
        reason = never_allowed(address)
        if reason:
            return f"{reason}, which no setting allows"
        if isinstance(address, ipaddress.IPv6Address):
            if address in _LOCAL_NAT64:
                return self._private("a local-use NAT64 address")
            inner = embedded_ipv4(address)
            if inner:
                return next((r for r in map(self.refusal, inner) if r), None)
        if address.is_loopback or address.is_unspecified:  # 0.0.0.0 reaches this host too
            if self.allow_loopback or self.allow_private_networks:
                return None
            return f"a loopback address; set {LOOPBACK_SETTING} to allow it"
        if address.is_global:
            return None
        return self._private("a private or reserved address")

    def _private(self, what: str) -> str | None:
        if self.allow_private_networks:
            return None
        return f"{what}; set {PRIVATE_SETTING} to allow it"


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, for TCP."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


#: Name resolutions running at once in a process (each in a thread of its own, see
#: `resolve_within`): hung resolvers can't pile up threads beyond this.
MAX_RESOLVING = 16
_RESOLVING = threading.BoundedSemaphore(MAX_RESOLVING)


def resolve_within(resolver: Resolver, host: str, port: int, timeout: float | None) -> list[str]:
    """`resolver(host, port)`, waited for at most `timeout` seconds (None: as long as it takes).

    `getaddrinfo` takes no timeout and can't be interrupted, so the resolver runs in a daemon
    thread: a resolver that hangs keeps that thread, never the caller (a relay slot) past the
    timeout.

    Raises:
        httpcore.ConnectTimeout: no answer within `timeout`.
    """
    if timeout is None:
        return resolver(host, port)
    deadline = time.monotonic() + timeout
    slots = _RESOLVING
    if not slots.acquire(timeout=max(0.0, timeout)):
        raise httpcore.ConnectTimeout(f"resolving {host} did not start within {timeout:g} s")
    answers: queue.SimpleQueue[tuple[list[str] | None, BaseException | None]] = queue.SimpleQueue()

    def run() -> None:
        try:
            answers.put((resolver(host, port), None))
        except BaseException as error:  # handed to the caller, who raises it
            answers.put((None, error))
        finally:
            slots.release()

    threading.Thread(target=run, name="webhooks-resolve", daemon=True).start()
    try:
        addresses, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise httpcore.ConnectTimeout(
            f"resolving {host} took longer than the {timeout:g} s left of the attempt"
        ) from None
    if error is not None:
        raise error
    assert addresses is not None
    return addresses


def allowed_addresses(
    host: str,
    port: int,
    policy: AddressPolicy,
    resolver: Resolver = resolve,
    timeout: float | None = None,
) -> list[str]:
    """The addresses of `host` to connect to, all of them allowed by `policy`; resolving them
    takes at most `timeout` seconds (see `resolve_within`).

    Raises:
        DestinationNotAllowedError: the host resolves to nothing, or any address of the host is
            not allowed (a host with one private address among public ones is refused: it could
            be picked on retry). The message names the setting that would allow it, if any.
        httpcore.ConnectTimeout: the resolver did not answer within `timeout`.
    """
    try:
        addresses = resolve_within(resolver, host, port, timeout)
    except OSError as error:
        raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
    if not addresses:
        raise DestinationNotAllowedError(f"{host} resolves to no address")
    for address in addresses:
        reason = policy.refusal(ipaddress.ip_address(address.split("%")[0]))
        if reason:
            raise DestinationNotAllowedError(f"{host} resolves to {address}: {reason}")
    return addresses


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the policy allows; name
    resolution, the connect and the streams are all bounded by the attempt's deadline
    (`webhooks.deadline`) and the connect timeout."""

    def __init__(self, policy: AddressPolicy, resolver: Resolver = resolve) -> None:
        self._policy = policy
        self._resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last_error: Exception | None = None
        addresses = allowed_addresses(host, port, self._policy, self._resolver, time_left(timeout))
        for address in addresses:
            try:
                stream = super().connect_tcp(
                    address, port, time_left(timeout), local_address, socket_options
                )
            except httpcore.ConnectError as error:
                last_error = error
            else:
                return DeadlineStream(stream)
        assert last_error is not None
        raise last_error
