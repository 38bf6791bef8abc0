"""Engines for the webhook processes (the relay, the commands); `webhooks` needs no `billing`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; plain `postgresql://` URLs use psycopg 3, SQLite waits on locks.

    No `pool_pre_ping` (as `billing.db`): it costs a round trip per transaction, and a relay
    retries what fails on a connection that turned out dead (a claim at its next poll, a
    recording kept and retried) after SQLAlchemy has emptied the pool of the dead ones.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
    return create_engine(parsed, **kwargs)


def libpq_url(engine: Engine) -> str | None:
    """The engine's PostgreSQL URL as libpq reads it (for a raw LISTEN connection), else None."""
    if engine.dialect.name != "postgresql":
        return None
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
