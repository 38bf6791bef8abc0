"""Real processes on the real PostgreSQL and Redis: the Procfile's worker and scheduler lines.

Each test gets its own Redis key namespace (`BROKER_NAMESPACE`) and the session's throwaway
PostgreSQL database; processes are started in their own process group and killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing.db import make_session_factory

ROOT = Path(__file__).resolve().parents[3]


def procfile_command(name: str) -> str:
    """The command of a Procfile line, exactly as a Procfile runner would run it."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return command.strip()
    raise LookupError(f"no {name!r} line in the Procfile")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)


@pytest.fixture
def namespace(redis_namespace: str) -> str:
    """The deployment's `BROKER_NAMESPACE`: the test's own Redis namespace."""
    return redis_namespace


@pytest.fixture
def base_env(pg_url: str, redis_url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a deployment on this PostgreSQL database and Redis namespace, with a
    metrics folder of the test's own (the Procfile's default is shared by the machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "REDIS_URL")}
    env.update(
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url,
        BROKER_NAMESPACE=namespace,
        WORKER_PROCESSES="1",
        WORKER_THREADS="4",
        PYTHONUNBUFFERED="1",
        dramatiq_prom_db=str(Path("/tmp") / f"dramatiq-prom-{namespace}"),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """`spawn(name, command, env)`: run a shell command line in its own process group."""
    started: list[Process] = []

    def start(name: str, command: str, env: dict[str, str]) -> Process:
        log = tmp_path / f"{name}-{len(started)}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        started.append(process)
        return process

    yield start
    for process in started:
        process.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


@pytest.fixture
def pg_factory(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateRedis:
    """A redis-server of this test's own, with an append-only file, that it may stop and start."""

    port: int
    folder: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: _pings(client), timeout=10, what="redis-server to start")
        client.close()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            self.popen.wait(timeout=10)


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
