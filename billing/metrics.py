"""Prometheus metrics of the ledger, and the exposition every process serves.

With `PROMETHEUS_MULTIPROC_DIR` set (before the process starts, as prometheus_client requires),
values are shared through files in that folder, so `/metrics` on any web worker, or the relay's
and scheduler's metrics ports, report the sum over all processes of the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

USAGE_INGEST = Counter("billing_usage_ingest", "Usage events received, by outcome.", ["outcome"])
AGGREGATE_DURATION_MS = Histogram(
    "billing_aggregate_duration_ms",
    "Time to compute and upsert one daily aggregate, in milliseconds.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
INVOICES_GENERATED = Counter("billing_invoice_generated", "Invoices created.")
PROVIDER_SYNC_FAILURES = Counter(
    "billing_provider_sync_failures", "Calls to the payment provider hook that raised."
)


@contextmanager
def timed_ms(histogram: Histogram) -> Iterator[None]:
    """Observe the block's duration in milliseconds."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe((time.perf_counter() - start) * 1000)


def registry() -> CollectorRegistry:
    """This process's registry, or one that gathers every process's files in multi-process mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        gathered = CollectorRegistry()
        multiprocess.MultiProcessCollector(gathered)  # type: ignore[no-untyped-call]
        return gathered
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The text exposition and its content type, for a `/metrics` endpoint."""
    return generate_latest(registry()), CONTENT_TYPE_LATEST


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose `/metrics` on `port` from a background thread (relay, scheduler)."""
    start_http_server(port, addr=addr, registry=registry())
