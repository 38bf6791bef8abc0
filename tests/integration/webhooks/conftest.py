"""Processes for the webhook fault tests: a subscriber and relays, on 127.0.0.1 and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tests.processes import Process, free_port, start
from webhooks.secrets import generate_secret

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


class Receiver:
    """The subscriber process; start, stop and restart it on one port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.secret = generate_secret()
        self.log = tmp / "received.jsonl"
        self.control = tmp / "control"
        self.log.touch()
        self.control.write_text("ok")
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        argv = [sys.executable, str(HERE / "receiver_process.py"), str(self.port), self.secret]
        self.process = subprocess.Popen(
            [*argv, str(self.log), str(self.control)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    def answer(self, mode: str) -> None:
        self.control.write_text(mode)

    def received(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def ids(self) -> list[str]:
        return [r["id"] for r in self.received()]


class Relays:
    """`python -m webhooks.relay` processes against the test database."""

    def __init__(self, database_url: str, tmp: Path) -> None:
        self.database_url = database_url
        self.tmp = tmp
        self.processes: list[Process] = []

    def start(self, **settings: object) -> Process:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "WEBHOOKS_ALLOW_LOOPBACK": "true",
            "WEBHOOKS_RETRY_SCHEDULE": "300ms,300ms,300ms",
            "WEBHOOKS_JITTER": "0",
            "WEBHOOKS_POLL_INTERVAL": "0.2",
            "WEBHOOKS_CLAIM_LEASE": "3s",
            "WEBHOOKS_CONNECT_TIMEOUT": "1",
            "WEBHOOKS_READ_TIMEOUT": "3",
            "PYTHONPATH": str(ROOT),
        }
        env.update({f"WEBHOOKS_{k.upper()}": str(v) for k, v in settings.items()})
        name = f"relay-{len(self.processes)}"
        process = start(name, [sys.executable, "-m", "webhooks.relay"], env, self.tmp / name)
        self.processes.append(process)
        return process

    def output(self) -> str:
        return "\n".join(process.output() for process in self.processes)

    def stop_all(self) -> None:
        for process in self.processes:
            process.signal(signal.SIGTERM)
        for process in self.processes:
            process.stop()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    receiver = Receiver(tmp_path)
    yield receiver
    receiver.stop()


@pytest.fixture
def relays(pg_engine: Engine, tmp_path: Path) -> Iterator[Relays]:
    relays = Relays(pg_engine.url.render_as_string(hide_password=False), tmp_path)
    yield relays
    relays.stop_all()


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(pg_engine, expire_on_commit=False)
