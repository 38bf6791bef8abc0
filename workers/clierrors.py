"""What the `billing` command line says when it cannot do its work: one line, exit 2.

`explain(error)` turns the failures an operator meets on the first day into one line saying what
is wrong and what to do: a malformed or unreachable `DATABASE_URL`, a database that was never
migrated, Redis down. `check_database_exists` refuses to open a SQLite file that does not exist
(SQLite would create an empty one in whatever folder the command runs from). Any other error is
a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

import redis
from dramatiq.errors import BrokerConnectionError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from billing.db import redact_url
from webhooks.safetext import safe_text
from workers.errors import WorkerError

EXIT_UNUSABLE = 2
"""The exit status of a command that could not run as configured."""

UNMIGRATED = "run `billing db upgrade`"


class CommandError(WorkerError):
    """A command cannot run as configured; the message says what to do. Permanent: the same
    command fails the same way until the operator acts."""


def check_database_exists(url: str) -> None:
    """Raise `CommandError` when `url` is a SQLite file that does not exist.

    Raises:
        CommandError: the file is missing (nothing is created).
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return  # explained when the command opens it
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database or "")
    if path.exists():
        return
    where = "" if path.is_absolute() else f", relative to this folder ({Path.cwd()})"
    raise CommandError(
        f"no database at {path.resolve()} (DATABASE_URL {redact_url(url)}{where}): "
        "set DATABASE_URL to your database, or create this one with `billing db upgrade`"
    )


def explain(error: BaseException, *, database_url: str) -> str | None:
    """One line for a known operational failure, else None (a bug: keep the traceback)."""
    if isinstance(error, CommandError):
        return str(error)
    if isinstance(error, ArgumentError | NoSuchModuleError):
        return (
            "DATABASE_URL is not a database URL (not shown: it may hold a password); use "
            "sqlite:///path/to/file.sqlite3 or postgresql://user:password@host/database"
        )
    if _is_missing_table(error):
        return f"the database at {_redacted(database_url)} has no billing tables: {UNMIGRATED}"
    if isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    ):
        return (
            f"cannot use the database at {_redacted(database_url)}: {_first_line(error.orig)}; "
            "check DATABASE_URL and that the server runs"
        )
    if isinstance(error, redis.ConnectionError | redis.TimeoutError | BrokerConnectionError):
        return (
            f"cannot reach Redis: {_first_line(error)}; check REDIS_URL and that Redis runs "
            "(the scheduler keeps retrying on its own)"
        )
    return None


def _is_missing_table(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    if getattr(error.orig, "sqlstate", None) == "42P01":  # PostgreSQL: undefined_table
        return True
    return "no such table" in str(error.orig)


def _redacted(url: str) -> str:
    try:
        return redact_url(url)
    except ArgumentError:
        return "DATABASE_URL"


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return safe_text(text[0] if text else type(error).__name__)[:300]
