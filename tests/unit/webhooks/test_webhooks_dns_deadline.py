"""Name resolution under the attempt's deadline: a hung resolver never holds a relay slot."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime

import httpcore
import pytest

from webhooks.delivery import Sender, make_client
from webhooks.ssrf import AddressPolicy, resolve_within
from webhooks.store import ClaimedDelivery

EVERYTHING = AddressPolicy(allow_loopback=True, allow_private_networks=True)


class HungResolver:
    """A resolver that answers only once released (as a DNS server that never replies)."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.release = threading.Event()

    def __call__(self, host: str, port: int) -> list[str]:
        self.called.set()
        self.release.wait(60)
        return ["127.0.0.1"]


@pytest.fixture
def hung() -> HungResolver:
    resolver = HungResolver()
    yield resolver
    resolver.release.set()


def delivery(url: str) -> ClaimedDelivery:
    return ClaimedDelivery("d", "e", "t.x", {}, datetime.now(UTC), "s", url, ("sekrit",), 1)


def test_a_hung_resolver_ends_the_attempt_at_its_deadline_as_a_timeout(hung) -> None:
    client = make_client(
        policy=EVERYTHING, connect_timeout=30, read_timeout=30, max_connections=2, resolver=hung
    )
    outcomes = []
    sender = Sender(client, user_agent="t", attempt_timeout=0.3)
    thread = threading.Thread(
        target=lambda: outcomes.append(sender.send(delivery("http://slow.test/h")))
    )
    with client:
        thread.start()
        thread.join(timeout=30)
        # The send ended while the resolver still hangs: the relay slot is free again.
        assert not thread.is_alive()
        assert hung.called.is_set()
        assert not hung.release.is_set()
    [outcome] = outcomes
    assert outcome.status_code is None
    assert not outcome.refused  # retried later, like any timeout
    assert (outcome.error or "").startswith("timeout: ConnectTimeout: resolving slow.test took")
    assert "attempt deadline 0.3 s" in (outcome.error or "")


def test_resolve_within_returns_the_answer_of_a_resolver_in_time() -> None:
    assert resolve_within(lambda host, port: ["192.0.2.1"], "a.test", 80, 5) == ["192.0.2.1"]


def test_resolve_within_hands_the_resolvers_error_to_the_caller() -> None:
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(socket.gaierror):
        resolve_within(failing, "nowhere.test", 80, 5)


def test_resolve_within_without_a_timeout_waits_in_the_callers_thread() -> None:
    threads: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        threads.append(threading.current_thread().name)
        return ["192.0.2.1"]

    resolve_within(resolver, "a.test", 80, None)
    resolve_within(resolver, "a.test", 80, 5)
    assert threads == [threading.current_thread().name, "webhooks-resolve"]


def test_hung_resolvers_hold_at_most_max_resolving_threads(hung, monkeypatch) -> None:
    from webhooks import ssrf

    monkeypatch.setattr(ssrf, "_RESOLVING", threading.BoundedSemaphore(1))
    with pytest.raises(httpcore.ConnectTimeout):
        resolve_within(hung, "a.test", 80, 0.2)  # takes the only slot, and keeps it
    before = threading.active_count()
    with pytest.raises(httpcore.ConnectTimeout, match="did not start"):
        resolve_within(hung, "b.test", 80, 0.2)
    assert threading.active_count() == before
