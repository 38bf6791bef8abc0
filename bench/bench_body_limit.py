"""What a 200 MiB request body costs the web process, with and without the body limit.

    python bench/bench_body_limit.py [--mebibytes 200] [--rounds 2]

Runs `uvicorn billing.app:app` (1 worker, SQLite in a temporary folder) twice per round: with
the default limits (`MAX_REQUEST_BYTES`, `MAX_BATCH_REQUEST_BYTES`) and, as the baseline, with
limits of 1 TB (what the app did before it had any). A client streams a chunked body of
`--mebibytes` MiB to `POST /_billing/usage/batch` with a valid key, and an `Idempotency-Key`
(the middleware reads bodies first). Printed per variant: the server's peak resident memory
growth (VmHWM after minus VmRSS before, from /proc), the MiB the client had sent when the answer
came, the seconds to the answer, and the status; then the ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from figures import load, spread

from billing.api.keys import create_key
from billing.db import make_engine, make_session_factory
from billing.migrate import upgrade

CHUNK = b"x" * 65536
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def start_server(database_url: str, limit: int | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
    if limit is not None:
        env |= {"MAX_REQUEST_BYTES": str(limit), "MAX_BATCH_REQUEST_BYTES": str(limit)}
    command = [sys.executable, "-m", "uvicorn", "billing.app:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, port
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("uvicorn did not start") from None
            time.sleep(0.05)


def stream(port: int, key: str, total: int) -> tuple[float, float, str]:
    """Send a chunked body of `total` bytes; (MiB sent at the answer, seconds, status line)."""
    head = (
        b"POST /_billing/usage/batch HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nIdempotency-Key: big\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\n\r\n"
    )
    sent = [0]
    answered = threading.Event()

    def sender(sock: socket.socket) -> None:
        try:
            sock.sendall(head)
            while sent[0] < total and not answered.is_set():
                sock.sendall(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                sent[0] += len(CHUNK)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        thread = threading.Thread(target=sender, args=(sock,))
        thread.start()
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
        at_answer = sent[0] / MIB
        elapsed = time.perf_counter() - start
        answered.set()
    thread.join(timeout=60)
    return at_answer, elapsed, answer.split(b"\r\n", 1)[0].decode()


def measure(database_url: str, key: str, limit: int | None, total: int) -> dict[str, float]:
    process, port = start_server(database_url, limit)
    try:
        before = memory_kib(process.pid, "VmRSS")
        sent, seconds, status = stream(port, key, total)
        time.sleep(0.5)
        peak = memory_kib(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(
        f"  {'limited' if limit is None else 'no limit':9} peak +{(peak - before) / 1024:7.1f} MiB"
        f"  sent {sent:7.1f} MiB at the answer  {seconds:6.2f} s  {status}"
    )
    return {"growth": (peak - before) / 1024, "sent": sent, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mebibytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    total = args.mebibytes * MIB
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.sqlite3"
        engine = make_engine(url)
        upgrade(engine)
        with make_session_factory(engine).begin() as session:
            _, key = create_key(session, tenant_id="bench", scopes=["billing.write"])
        engine.dispose()
        results: dict[str, list[dict[str, float]]] = {"limited": [], "baseline": []}
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} ({load()})")
            results["limited"].append(measure(url, key, None, total))
            results["baseline"].append(measure(url, key, 10**12, total))
    for field, unit in (
        ("growth", "MiB peak memory growth"),
        ("sent", "MiB sent"),
        ("seconds", "s"),
    ):
        limited = [r[field] for r in results["limited"]]
        baseline = [r[field] for r in results["baseline"]]
        ratio = [b / max(a, 0.1) for a, b in zip(limited, baseline, strict=True)]
        print(
            f"{unit:24} limited {spread(limited, ',.1f')}  no limit {spread(baseline, ',.1f')}"
            f"  baseline / limited {spread(ratio, ',.1f')}"
        )


if __name__ == "__main__":
    main()
