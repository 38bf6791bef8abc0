"""Mappers from our invoices to payment providers, usable as `provider_sync`."""

from billing.providers.stripe import StripeError, StripeInvoiceSync

__all__ = ["StripeError", "StripeInvoiceSync"]
