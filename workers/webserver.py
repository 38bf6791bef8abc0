"""An ASGI app served by uvicorn from a background thread (the web API of `billing run`).

uvicorn installs no signal handlers outside the main thread, so the process's own SIGTERM and
Ctrl-C handling stays in charge; `stop()` asks the server to finish the requests in hand and
waits for it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import uvicorn

#: Longest wait for the server to listen, and for it to stop, in seconds.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


class WebServerError(RuntimeError):
    """The server could not start (the port is taken, the address is not local, …)."""


class WebServer:
    """uvicorn serving `app` on `host:port` in a thread; port 0 picks a free one."""

    name = "web API"

    def __init__(self, app: Any, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="web-api", daemon=True)
        self.host = host
        self.port = port

    def start(self) -> WebServer:
        """Start serving; return once the socket listens.

        Raises:
            WebServerError: the server stopped or did not listen within `START_TIMEOUT`.
        """
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise WebServerError(f"the web API could not listen on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        return self

    def _serve(self) -> None:
        # uvicorn exits when it cannot listen; `start` reports that.
        with contextlib.suppress(SystemExit):
            self._server.run()

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop accepting, finish the requests in hand, wait for the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)
