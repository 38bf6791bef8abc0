"""Settings read from the environment once, at a process entry point, and passed down."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.late_usage import DEFAULT_LOOKBACK, LateUsage
from billing.lifecycle import InvoicePolicy

DEFAULT_DATABASE_URL = "sqlite:///billing.sqlite3"


class BillingSettings(BaseSettings):
    """Where the ledger lives and how invoices are issued.

    `DATABASE_URL`: a SQLAlchemy URL, a SQLite file by default. `INVOICE_NUMBER_PREFIX`
    (`INV-`): what invoice numbers start with. `INVOICE_GRACE_PERIOD` (0; seconds or ISO 8601,
    e.g. `PT72H`): how long a new invoice stays a draft before it is finalized. `LATE_USAGE`
    (`next_invoice`, `reject` or `ignore`) and `LATE_USAGE_LOOKBACK` (35 days): what becomes of
    usage in a period that already has a finalized invoice (see `billing.late_usage`).
    `REDIS_URL` and `BROKER_NAMESPACE` (`billing`): where `billing keys revoke` tells the web
    processes that cache API keys (`API_KEY_CACHE_TTL`) to read them again.
    """

    model_config = SettingsConfigDict(extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    sql_echo: bool = False
    invoice_number_prefix: str = "INV-"
    invoice_grace_period: timedelta = timedelta(0)
    late_usage: LateUsage = "next_invoice"
    late_usage_lookback: timedelta = DEFAULT_LOOKBACK
    redis_url: str = ""
    broker_namespace: str = "billing"

    @field_validator("invoice_grace_period", "late_usage_lookback", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """Plain numbers (as environment strings) are seconds."""
        if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return value

    def invoice_policy(self) -> InvoicePolicy:
        """The invoice settings as the service takes them."""
        return InvoicePolicy(
            number_prefix=self.invoice_number_prefix,
            grace_period=self.invoice_grace_period,
            late_usage=self.late_usage,
            late_usage_lookback=self.late_usage_lookback,
        )
