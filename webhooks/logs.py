"""Logging of the relay process: text lines, or one JSON object per line with `LOG_FORMAT=json`.

The JSON lines have the same shape as the billing processes' (`workers.logs`): `time` (UTC),
`level`, `logger`, `message`, then the record's `extra=` fields as keys, so a delivery's line
carries `event_id`, `subscription_id`, `tenant_id`, `outcome`, `status_code`, `duration_ms`.
Neither format writes untrusted text raw (`webhooks.safetext`): a tenant's metric name or a
subscriber's response can't forge a line or put escape sequences on an operator's terminal.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from webhooks.safetext import json_safe, safe_lines, safe_text

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: Attributes every `LogRecord` has: the rest are fields given through `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class TextFormatter(logging.Formatter):
    """`logging.Formatter` that escapes the message, and each line of a traceback.

    A traceback's lines are indented: only a record's own line starts at column 0, so an
    exception message spanning lines can't pass for another record.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return safe_text(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return safe_lines(super().formatException(ei), indent="  ")

    def formatStack(self, stack_info: str) -> str:
        return safe_lines(super().formatStack(stack_info), indent="  ")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json_safe(json.dumps(entry, default=str, ensure_ascii=False))


def configure_logging(log_format: str, level: str) -> None:
    """Log at `level` to standard error, as text or JSON (`log_format`); for a process's entry."""
    handler = logging.StreamHandler()
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request at INFO: outcomes worth reading are logged by the relay instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
