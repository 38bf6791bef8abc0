"""Invoice previews: the lines and total an invoice of a period would have now, stored nowhere.

A preview prices the period with `invoicing.price_lines`, the very function that prices an
invoice when it is generated or a draft re-priced, so a preview taken just before generating
equals the invoice generated. It only reads: no row, no outbox event, no number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from billing import invoicing
from billing.usage_lines import LineDraft


@dataclass(frozen=True, slots=True)
class InvoicePreview:
    """What an invoice of `[period_start, period_end)` in `currency` would bill now."""

    tenant_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    lines: tuple[LineDraft, ...]

    @property
    def total_amount(self) -> int:
        """The sum of the lines' amounts, in the currency's minor unit."""
        return sum(line.amount for line in self.lines)


def preview(
    session: Session,
    tenant_id: str,
    period_start: datetime,
    period_end: datetime,
    currency: str,
    adjustments: Sequence[LineDraft] = (),
) -> InvoicePreview:
    """Price the tenant's period as an invoice generated now would, storing nothing; with the
    `adjustments` (late usage of earlier invoices) it would carry.

    Raises:
        InvalidPeriodError: naive or reversed period, or a malformed currency.
        CurrencyMismatchError: the tenant's plans have prices, none in `currency`.
    """
    code = invoicing.check_period(period_start, period_end, currency)
    lines = invoicing.price_lines(session, tenant_id, period_start, period_end, code)
    lines += adjustments
    return InvoicePreview(tenant_id, period_start, period_end, code, tuple(lines))
