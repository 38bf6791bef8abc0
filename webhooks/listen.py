"""The app behind `billing webhooks listen`: verify each delivery and print it as a JSON line.

Verified deliveries go to stdout, one JSON object per line; rejected and repeated ones are
reported on stderr.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence

from fastapi import Depends, FastAPI, HTTPException, Request

from webhooks.receiver import (
    MemoryDedupeStore,
    ReceivedWebhook,
    add_problem_handler,
    webhook_receiver,
)
from webhooks.safetext import safe_text


def make_listen_app(secrets: Sequence[str]) -> FastAPI:
    """Accept verified deliveries on any path, print them, drop repeats."""
    app = FastAPI(title="billing webhooks listen")
    add_problem_handler(app, on_problem=_report)
    receive = webhook_receiver(list(secrets), dedupe=MemoryDedupeStore())
    output = threading.Lock()

    @app.post("/{path:path}")
    def delivered(path: str, event: ReceivedWebhook = Depends(receive)) -> dict[str, bool]:  # noqa: B008
        line = {"id": event.id, "type": event.type, "timestamp": event.timestamp}
        text = json.dumps(line | {"data": event.data}) + "\n"
        with output:  # requests run in threads: one whole line at a time
            sys.stdout.write(text)
            sys.stdout.flush()
        return {"ok": True}

    return app


def _report(request: Request, exc: HTTPException) -> None:
    event_id = request.headers.get("webhook-id", "?")
    print(
        f"{exc.status_code} {safe_text(event_id)}: {safe_text(exc.detail)}",
        file=sys.stderr,
        flush=True,
    )
