"""Logging of the billing processes: one line per job, and JSON lines when `LOG_FORMAT=json`.

`configure_logging` is called once at each entry point (the `billing` command, the scheduler,
each `dramatiq` worker process at boot). `job_log` wraps one run of a job and logs one line when
it ends, whatever the outcome:

    job billing.generate_monthly_invoice ok in 41.2 ms: tenant_id=t1 … status=open invoice_id=…

`ok` (INFO), `failed` (WARNING: a transient error, retried while retries are left) or `rejected`
(ERROR: a permanent error, dead-lettered). In JSON the fields are keys of the object:
`{"time": …, "level": "INFO", "logger": "workers.jobs", "message": "…", "job": …,
"outcome": "ok", "duration_ms": 41.2, "tenant_id": "t1", …}`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from dramatiq.middleware import CurrentMessage

from webhooks.logs import TEXT_FORMAT, JsonFormatter, TextFormatter
from workers.settings import LogSettings

_OUTCOME_LEVELS = {"ok": logging.INFO, "failed": logging.WARNING, "rejected": logging.ERROR}


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is at the time (it may be swapped after set-up)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(settings: LogSettings, *, stream: TextIO | None = None) -> None:
    """Log at `LOG_LEVEL`, in `LOG_FORMAT`, to `stream` (default: standard error).

    Where logging was set up already by `logging.basicConfig` (a `dramatiq` worker process
    does), that handler is kept, at `LOG_LEVEL`, and for JSON given the JSON formatter. Other
    handlers (an embedding application's, pytest's) and their levels are left alone. Calling it
    again replaces what it set up before.
    """
    root = logging.getLogger()
    formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter(TEXT_FORMAT)
    for existing in list(root.handlers):
        if getattr(existing, "_billing", False):
            root.removeHandler(existing)
    if root.handlers and stream is None:
        plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
        if plain:
            root.setLevel(settings.log_level)
        for existing in plain:  # Dramatiq's: keep its layout as text, but escaped
            keep = existing.formatter._fmt if existing.formatter is not None else TEXT_FORMAT
            json_lines = settings.log_format == "json"
            existing.setFormatter(formatter if json_lines else TextFormatter(keep))
        return
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    )
    setattr(handler, "_billing", True)  # noqa: B010 - marks the handler this function owns
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(settings.log_level)


@contextmanager
def job_log(
    logger: logging.Logger,
    job: str,
    *,
    permanent: tuple[type[BaseException], ...] = (),
) -> Iterator[dict[str, Any]]:
    """Log one line when the block ends: the job, its outcome, duration and fields.

    Yields a dict the job fills with what it learns (`tenant_id`, ids, totals). Inside a
    Dramatiq worker the message id and retry count are added. Exceptions pass through.
    """
    fields: dict[str, Any] = {}
    message = CurrentMessage.get_current_message()
    started = time.perf_counter()
    outcome, error = "ok", None
    try:
        yield fields
    except BaseException as exc:
        outcome = "rejected" if isinstance(exc, permanent) else "failed"
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if message is not None:
            fields["message_id"] = message.message_id
            fields["retries"] = message.options.get("retries", 0)
        if error is not None:
            fields["error"] = error
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        logger.log(
            _OUTCOME_LEVELS[outcome],
            "job %s %s in %.1f ms: %s",
            job,
            outcome,
            duration_ms,
            _Fields(fields),
            extra={"job": job, "outcome": outcome, "duration_ms": duration_ms, **fields},
        )


class _Fields:
    """`key=value key=value`, built only if the line is actually written."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.fields.items())
