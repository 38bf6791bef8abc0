"""The processes tests start, written once: a free loopback port, polling until something holds,
a command in its own process group with its output in a log file, and web servers (a process,
or an app under uvicorn in a thread) that answer before the test goes on.

Every process is stopped the same way: SIGTERM to its group, then SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parents[1]


def procfile_command(name: str) -> str:
    """The command of a Procfile line, exactly as a Procfile runner would run it."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return command.strip()
    raise LookupError(f"no {name!r} line in the Procfile")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], object],
    timeout: float = 20.0,
    *,
    what: str = "the condition",
    interval: float = 0.05,
) -> None:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Process:
    """A started command: its name, its `Popen` and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send `signum` to the process's group, if it still runs."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        self.signal(signal.SIGTERM)
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(5)


def start(
    name: str, command: list[str] | str, env: dict[str, str], log: Path, cwd: Path = ROOT
) -> Process:
    """Run `command` (an argv, or a shell command line run as a Procfile runner does) in its
    own process group, its output in `log`."""
    argv = ["/bin/sh", "-c", f"exec {command}"] if isinstance(command, str) else command
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Process(name, popen, log)


@contextlib.contextmanager
def serving(
    command: list[str] | str,
    env: dict[str, str],
    log: Path,
    port: int,
    *,
    cwd: Path = ROOT,
    ready: str = "/openapi.json",
    timeout: float = 60,
) -> Iterator[str]:
    """Run a web server on `port` (`env` is added to this process's environment); yield its base
    URL once `ready` answers; stop it when done."""
    process = start("server", command, {**os.environ, "PYTHONUNBUFFERED": "1", **env}, log, cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(process, f"{base}{ready}"), timeout, what=f"{base}{ready}")
        yield base
    finally:
        process.stop()


def _answers(process: Process, url: str) -> bool:
    assert process.popen.poll() is None, process.output()
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    return True


class _Accept(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def accepting_receiver(path: str = "/hooks") -> Iterator[str]:
    """A webhook receiver in a thread that answers every POST with 204; its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn (one worker, in a thread) on a free loopback port; its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 10, what="uvicorn to start")
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
