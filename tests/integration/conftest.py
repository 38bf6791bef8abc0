"""A deployment on the real PostgreSQL and Redis, for tests that start its processes.

Each test gets its own Redis key namespace (`BROKER_NAMESPACE`) and the session's throwaway
PostgreSQL database; processes are started in their own process group and killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing.db import make_session_factory
from tests.processes import Process, start


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

    def spawn(name: str, command: str, env: dict[str, str]) -> Process:
        process = start(name, command, env, tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        return process

    yield spawn
    for process in started:
        process.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


@pytest.fixture
def pg_factory(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)
