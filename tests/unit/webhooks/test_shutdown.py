"""SIGTERM and SIGINT stop the long-running processes: the handler calls back and sets the event."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from webhooks.shutdown import stop_on_signals, wait_for_stop


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_calls_back_and_sets_the_stop_event(signum: int) -> None:
    called: list[str] = []
    stopping = stop_on_signals(lambda: called.append("first"), lambda: called.append("second"))
    assert not stopping.is_set()
    os.kill(os.getpid(), signum)  # the handler runs on the main thread, before kill returns
    assert stopping.is_set()
    assert called == ["first", "second"]
    wait_for_stop(stopping)  # returns at once


def test_waiting_ends_when_the_event_is_set() -> None:
    stopping = threading.Event()
    threading.Timer(0.05, stopping.set).start()
    wait_for_stop(stopping)
    assert stopping.is_set()
