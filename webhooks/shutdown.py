"""Run until SIGTERM or SIGINT: how the relay, the scheduler and `billing run` wait.

The handlers only call what the process asks and set an event, so a signal that arrives before
the process has started is not lost; the main thread wakes each second so that they run.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)


def stop_on_signals(*on_stop: Callable[[], None]) -> threading.Event:
    """Handle SIGTERM and SIGINT: call each of `on_stop`, then set the event returned."""
    stopping = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        for callback in on_stop:
            callback()
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stopping


def wait_for_stop(stopping: threading.Event) -> None:
    """Block until `stopping` is set, waking each second so that signal handlers run."""
    while not stopping.wait(timeout=1.0):
        pass
