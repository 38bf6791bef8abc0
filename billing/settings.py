"""Settings read from the environment once, at a process entry point, and passed down."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///billing.sqlite3"


class BillingSettings(BaseSettings):
    """Where the ledger lives. `DATABASE_URL`: a SQLAlchemy URL; SQLite file by default."""

    model_config = SettingsConfigDict(extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    sql_echo: bool = False
