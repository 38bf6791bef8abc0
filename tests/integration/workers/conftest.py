"""A Redis server of a test's own (to stop and start) and Redis clients closed at teardown;
the deployment fixtures (`spawn`, `base_env`) are `tests/integration/conftest.py`'s."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.processes import Process, free_port, start, wait_until


@dataclass
class PrivateRedis:
    """A redis-server of this test's own, with an append-only file, that it may stop and start."""

    port: int
    folder: Path
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        argv += ["--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always"]
        log = self.folder / "redis-server.log"
        self.process = start("redis", [*argv, "--save", ""], dict(os.environ), log)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: _pings(client), timeout=10, what="redis-server to start")
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.process is not None:
            self.process.stop(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path, redis_url: str) -> Iterator[PrivateRedis]:
    """Never the shared server: a separate redis-server on a free loopback port."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    server = PrivateRedis(port=free_port(), folder=tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clients() -> Iterator[Callable[[redis.Redis], redis.Redis]]:
    """`clients(redis.Redis(...))`: the client is closed when the test ends."""
    opened: list[redis.Redis] = []

    def keep(client: redis.Redis) -> redis.Redis:
        opened.append(client)
        return client

    yield keep
    for client in opened:
        client.close()
