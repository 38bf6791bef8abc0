"""Billing exceptions.

BillingError
├── InvalidUsageError          bad input; permanent, never retry
├── IdempotencyConflictError   same idempotency key, different event; permanent
├── InvalidPeriodError         bad invoice period or currency, or one not ended yet; permanent
├── CurrencyMismatchError      the plan has prices, none in the asked currency; permanent
├── PriceDefinitionError       a price is malformed or cannot be evaluated; permanent
├── InvalidSubscriptionError   a subscription ends before it starts or overlaps another; permanent
│   └── SubscriptionConflictError  it overlaps or repeats one stored (`.existing_id`); permanent
├── MeterDefinitionError       a meter declaration is malformed; permanent
├── UnknownInvoiceError        no invoice of this tenant has that id; permanent
├── InvoiceStateError          the invoice's status forbids the change asked for; permanent
├── CatalogError               a catalogue file is malformed (names file, entry, field); permanent
├── InvalidCreditNoteError     a credit note's amount, lines or reason is malformed; permanent
├── CreditExceedsInvoiceError  credit notes would exceed the invoice's total; permanent
├── InvalidTimezoneError       not an IANA time zone name, or not in this machine's; permanent
├── TimezoneLockedError        the tenant's zone cannot change: it has invoices; permanent
├── PeriodClosedError          usage in a finalized period (LATE_USAGE=reject); permanent
├── TooManyMetricsError        a tenant's month already has its limit of distinct metrics; permanent
├── AmountOverflowError        an invoice line or total exceeds 2**63-1 minor units; permanent
├── QuotaExceededError         a hard quota is used up; retry after the window resets
└── ProviderSyncError          the provider hook failed; transient, the invoice is kept
"""

from __future__ import annotations

from datetime import datetime, tzinfo


class BillingError(Exception):
    """Base of every error the billing package raises."""


class InvalidUsageError(BillingError, ValueError):
    """A usage event (or a field of one) is malformed; nothing was stored."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IdempotencyConflictError(BillingError):
    """An idempotency key was reused for an event with another amount or time."""

    def __init__(self, message: str, *, existing_id: str | None = None) -> None:
        super().__init__(message)
        self.existing_id = existing_id


class InvalidPeriodError(BillingError, ValueError):
    """An invoice period is naive, empty or reversed, or its currency is not ISO 4217-shaped."""


class CurrencyMismatchError(BillingError):
    """The tenant's plan has prices, but none in the currency asked for."""


class UnknownInvoiceError(BillingError, LookupError):
    """No invoice of the tenant has that id (another tenant's invoice is not found either)."""


class InvoiceStateError(BillingError):
    """The invoice's status does not allow the change: paying a draft, voiding a paid invoice,
    re-pricing a finalized one. Nothing was changed."""

    def __init__(self, message: str, *, invoice_id: str, status: str) -> None:
        super().__init__(message)
        self.invoice_id = invoice_id
        self.status = status


class PriceDefinitionError(BillingError, ValueError):
    """A price is malformed or cannot be evaluated: a negative or over-precise amount, no unit
    amount, malformed tiers, a bad package size. `.field` names the field when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidSubscriptionError(BillingError, ValueError):
    """A subscription ends before it starts, or overlaps another of its tenant; not stored."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SubscriptionConflictError(InvalidSubscriptionError):
    """A subscription would overlap another of its tenant, or put the tenant on the plan it is
    already on at that time (a request sent twice); `.existing_id` names the one in the way."""

    def __init__(self, message: str, *, existing_id: str | None) -> None:
        super().__init__(message, field="effective_at")
        self.existing_id = existing_id


class MeterDefinitionError(BillingError, ValueError):
    """A meter declaration is malformed (`.field` names the field); nothing was stored."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CatalogError(BillingError, ValueError):
    """A catalogue document is not YAML or breaks a rule; nothing was applied. The message names
    the file, the entry (`plan 'pro', price 'pro-fee'`) and the field."""

    def __init__(self, message: str, *, source: str, entry: str = "", field: str = "") -> None:
        super().__init__(message)
        self.source, self.entry, self.field = source, entry, field


class InvalidTimezoneError(BillingError, ValueError):
    """A time zone is not an IANA name known here (`America/New_York`); nothing was stored."""

    def __init__(self, message: str, *, field: str = "timezone") -> None:
        super().__init__(message)
        self.field = field


class TimezoneLockedError(BillingError):
    """The tenant has an invoice that is not void, whose period was cut in its current zone:
    the zone stays as it is. Void the invoices first (a draft included) to change it."""

    def __init__(self, message: str, *, invoice_id: str) -> None:
        super().__init__(message)
        self.invoice_id = invoice_id


class QuotaExceededError(BillingError):
    """A hard quota has no room left in the current window."""


class ProviderSyncError(BillingError):
    """The provider sync hook raised; the invoice it was given stays in place."""

    def __init__(self, message: str, *, invoice_id: str) -> None:
        super().__init__(message)
        self.invoice_id = invoice_id


class InvalidCreditNoteError(BillingError, ValueError):
    """A credit note's amount, lines or reason is malformed; nothing was stored."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class CreditExceedsInvoiceError(BillingError):
    """The invoice's credit notes would add up to more than its total; nothing was stored."""

    def __init__(self, message: str, *, invoice_id: str, available: int) -> None:
        super().__init__(message)
        self.invoice_id = invoice_id
        self.available = available


class PeriodClosedError(BillingError):
    """Under `LATE_USAGE=reject`, a usage event falls in a period that has a finalized invoice
    (`[period_start, period_end)`); nothing was stored. `.index` is the event's index in a batch."""

    def __init__(
        self,
        message: str,
        *,
        period_start: datetime,
        period_end: datetime,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.period_start = period_start
        self.period_end = period_end
        self.index = index


class TooManyMetricsError(BillingError):
    """A new metric would exceed the tenant's limit of distinct metrics in a month of its zone
    (`MAX_METRICS_PER_TENANT`); nothing was stored. Metrics the month already has are still
    taken. `.limit` is the limit, `.month` the first instant (UTC) of the month."""

    def __init__(self, message: str, *, limit: int, month: datetime) -> None:
        super().__init__(message)
        self.limit = limit
        self.month = month

    @classmethod
    def over_limit(
        cls, *, limit: int, month: datetime, held: int, added: int, tz: tzinfo
    ) -> TooManyMetricsError:
        """The refusal of `added` new metrics in `month` of zone `tz`, which has `held`."""
        return cls(
            f"the tenant has {held} distinct metrics in {month.astimezone(tz):%Y-%m} ({tz}) "
            f"and these events add {added}: MAX_METRICS_PER_TENANT is {limit}",
            limit=limit,
            month=month,
        )


class AmountOverflowError(BillingError):
    """An invoice line or total is over 2**63-1 minor units (the largest amount stored);
    nothing was stored. `.metric` and `.price_key` name the line (None for the total)."""

    def __init__(self, message: str, *, metric: str | None, price_key: str | None) -> None:
        super().__init__(message)
        self.metric = metric
        self.price_key = price_key


PERMANENT_ERRORS: tuple[type[BillingError], ...] = (
    InvalidUsageError,
    IdempotencyConflictError,
    InvalidPeriodError,
    CurrencyMismatchError,
    PriceDefinitionError,
    InvalidSubscriptionError,
    SubscriptionConflictError,
    MeterDefinitionError,
    UnknownInvoiceError,
    InvoiceStateError,
    InvalidCreditNoteError,
    CreditExceedsInvoiceError,
    PeriodClosedError,
    TooManyMetricsError,
    AmountOverflowError,
    InvalidTimezoneError,
)
"""Errors that retrying can never fix (Dramatiq's `throws=`). Only errors a job can raise:
`CatalogError` and `TimezoneLockedError` come from operators' commands and routes alone."""
