"""Load the payment provider hook that `PROVIDER_SYNC` names.

`PROVIDER_SYNC=package.module:name` names one of two things, told apart by how `name` can be
called:

- the hook itself: a plain or `async` callable `(invoice, lines)` returning the provider's
  invoice id (what `BillingService(provider_sync=...)` takes), e.g. a module-level
  `StripeInvoiceSync(...)` instance or a function;
- a factory: a callable taking no arguments that returns such a hook, called once when the
  worker process boots. Use it to build the hook from secrets and clients at boot rather than
  at import, e.g. `def stripe_sync(): return StripeInvoiceSync(api_key=..., ...)`.

Whatever can be called with no arguments is taken for a factory.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, cast

from billing import ProviderSync
from workers.errors import InvalidProviderSyncError


def load_provider_sync(spec: str) -> ProviderSync:
    """Import `package.module:name` and return the hook it names (calling it if a factory).

    Raises:
        InvalidProviderSyncError: the module or name cannot be imported, or names neither a
            hook `(invoice, lines)` nor a factory returning one.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InvalidProviderSyncError(f"PROVIDER_SYNC {spec!r} must be package.module:name")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise InvalidProviderSyncError(f"PROVIDER_SYNC {spec!r}: {error}") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidProviderSyncError(
                f"PROVIDER_SYNC {spec!r}: {module_name} has no {attribute}"
            ) from None
    if _accepts(target, 0):
        target = target()
    if not _accepts(target, 2):
        raise InvalidProviderSyncError(
            f"PROVIDER_SYNC {spec!r} is neither a hook (invoice, lines) nor a factory of one"
        )
    return cast(ProviderSync, target)


def _accepts(target: object, arguments: int) -> bool:
    """True if `target` can be called with `arguments` positional arguments."""
    if not callable(target):
        return False
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have none: trust them with the hook's call
        return arguments == 2
    try:
        signature.bind(*([None] * arguments))
    except TypeError:
        return False
    return True
