"""A subscriber for the fault tests, run as its own process on 127.0.0.1.

`python receiver_process.py PORT SECRET LOG CONTROL`: every POST is verified with the public
`standardwebhooks` package; verified ones are appended to LOG as JSON lines
`{"id", "ts", "ua", "type", "data", "at"}`. CONTROL holds how to answer: `ok` (204), a status code
(`500`, `410`), or `slow` (wait 0.4 s, then 204). Unverifiable deliveries get 400 and no log line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import standardwebhooks


def main() -> None:
    port, secret, log_path, control_path = sys.argv[1:5]
    webhook = standardwebhooks.Webhook(secret)
    lock = threading.Lock()
    log = Path(log_path).open("a", buffering=1)  # noqa: SIM115 - open for the process's life

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            mode = Path(control_path).read_text().strip() or "ok"
            try:
                envelope = webhook.verify(body, dict(self.headers))
            except Exception:
                self._answer(400)
                return
            if mode.isdigit() and int(mode) >= 300:
                self._answer(int(mode))
                return
            if mode == "slow":
                time.sleep(0.4)
            line = {
                "id": self.headers["webhook-id"],
                "ts": self.headers["webhook-timestamp"],
                "ua": self.headers["user-agent"],
                "type": envelope["type"],
                "data": envelope["data"],
                "at": time.time(),
            }
            with lock:
                log.write(json.dumps(line) + "\n")
            self._answer(204)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
