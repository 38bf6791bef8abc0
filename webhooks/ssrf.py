"""The SSRF guard: deliveries go to public addresses only, unless settings allow more.

The check runs where the relay opens each TCP connection (a network backend for httpcore), on
every address the host name resolves to, and the connection goes to the address that was
checked, so a DNS answer that changes between a check and the connect cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore

from webhooks.errors import DestinationNotAllowedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class AddressPolicy:
    """Which non-public addresses a delivery may reach."""

    allow_loopback: bool = False
    allow_private_networks: bool = False

    def allows(self, address: IPAddress) -> bool:
        """True if a connection to `address` is allowed."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback or address.is_unspecified:  # 0.0.0.0 reaches this host too
            return self.allow_loopback or self.allow_private_networks
        if address.is_global and not address.is_multicast:
            return True
        return self.allow_private_networks


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, for TCP."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def allowed_addresses(
    host: str, port: int, policy: AddressPolicy, resolver: Resolver = resolve
) -> list[str]:
    """The addresses of `host` to connect to, all of them allowed by `policy`.

    Raises:
        DestinationNotAllowedError: any address of the host is not allowed (a host with one
            private address among public ones is refused: it could be picked on retry).
    """
    try:
        addresses = resolver(host, port)
    except OSError as error:
        raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
    refused = [a for a in addresses if not policy.allows(ipaddress.ip_address(a.split("%")[0]))]
    if refused or not addresses:
        raise DestinationNotAllowedError(
            f"{host} resolves to {', '.join(refused) or 'nothing'}, which deliveries may not reach"
        )
    return addresses


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses the policy allows."""

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
        for address in allowed_addresses(host, port, self._policy, self._resolver):
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as error:
                last_error = error
        assert last_error is not None
        raise last_error
