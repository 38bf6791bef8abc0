"""Wake the relay when an event commits: PostgreSQL `LISTEN`, in a thread of its own.

The listener holds one autocommit connection and calls `on_notify` for each notification. If the
connection drops it reconnects after a pause; meanwhile the relay's polling still finds the work,
only later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)


class PgListener:
    """Listens on one channel until stopped."""

    def __init__(
        self,
        url: str,
        channel: str,
        on_notify: Callable[[], None],
        *,
        check_every: float = 1.0,
        reconnect_after: float = 2.0,
    ) -> None:
        self._url = url
        self._channel = channel
        self._on_notify = on_notify
        self._check_every = check_every
        self._reconnect_after = reconnect_after
        self._stop = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-listener", daemon=True)

    def start(self) -> PgListener:
        """Start listening in the background."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and wait for the thread (it notices within `check_every` seconds)."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except psycopg.Error as error:
                self.listening.clear()
                logger.warning(
                    "LISTEN %s failed (%s); polling until it is back", self._channel, error
                )
                self._stop.wait(self._reconnect_after)

    def _listen(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self.listening.set()
            # Catch what committed before LISTEN took effect.
            self._on_notify()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=self._check_every):
                    self._on_notify()
                    if self._stop.is_set():
                        break
