"""A payment provider hook for the process tests, named by `PROVIDER_SYNC`.

`factory` is what `PROVIDER_SYNC=tests.integration.workers.fake_provider:factory` names: the
worker calls it once at boot. The hook fails the first call for each invoice (an outage), then
answers `prov_<invoice id>`.
"""

from __future__ import annotations

from typing import Any

_failed_once: set[str] = set()


def flaky_provider(invoice: Any, lines: list[Any]) -> str:
    if invoice.id not in _failed_once:
        _failed_once.add(invoice.id)
        raise ConnectionError("payment provider unreachable")
    return f"prov_{invoice.id}"


def factory() -> Any:
    return flaky_provider
