"""billing-workers' ledger: usage, plans, prices, subscriptions and invoices.

The quick start:

    from billing import BillingService
    bs = BillingService(session=session, tenant_id="t_123")
    bs.record_usage(metric="tokens", amount=42, at=now, idempotency_key="req-42")
"""

from billing import catalog_rules  # noqa: F401 - registers the catalogue rules on flush
from billing.errors import (
    AmountOverflowError,
    BillingError,
    CreditExceedsInvoiceError,
    CurrencyMismatchError,
    IdempotencyConflictError,
    InvalidCreditNoteError,
    InvalidPeriodError,
    InvalidSubscriptionError,
    InvalidTimezoneError,
    InvalidUsageError,
    InvoiceStateError,
    MeterDefinitionError,
    PeriodClosedError,
    PriceDefinitionError,
    ProviderSyncError,
    QuotaExceededError,
    SubscriptionConflictError,
    TimezoneLockedError,
    TooManyMetricsError,
    UnknownInvoiceError,
)
from billing.lifecycle import InvoicePolicy
from billing.provider_sync import ProviderSync
from billing.service import BillingService

__all__ = [
    "AmountOverflowError",
    "BillingError",
    "BillingService",
    "CreditExceedsInvoiceError",
    "CurrencyMismatchError",
    "IdempotencyConflictError",
    "InvalidPeriodError",
    "InvalidSubscriptionError",
    "InvalidCreditNoteError",
    "InvalidTimezoneError",
    "InvalidUsageError",
    "MeterDefinitionError",
    "InvoicePolicy",
    "InvoiceStateError",
    "PeriodClosedError",
    "PriceDefinitionError",
    "ProviderSync",
    "ProviderSyncError",
    "QuotaExceededError",
    "SubscriptionConflictError",
    "TimezoneLockedError",
    "TooManyMetricsError",
    "UnknownInvoiceError",
]
