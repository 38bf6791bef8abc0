"""Prometheus metrics of the ledger, and the exposition every process serves.

With `PROMETHEUS_MULTIPROC_DIR` set (before the process starts, as prometheus_client requires),
values are shared through files in that folder, so `/metrics` on any web worker, or the relay's
and scheduler's metrics ports, report the sum over all processes of the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector

from webhooks.metrics import exposition_registry
from webhooks.metrics import serve as serve_exposition

USAGE_INGEST = Counter("billing_usage_ingest", "Usage events received, by outcome.", ["outcome"])
# The labelled children, looked up once: ingest is the hot path.
USAGE_STORED = USAGE_INGEST.labels(outcome="stored")
USAGE_DUPLICATE = USAGE_INGEST.labels(outcome="duplicate")
USAGE_REJECTED = USAGE_INGEST.labels(outcome="rejected")
AGGREGATE_DURATION_MS = Histogram(
    "billing_aggregate_duration_ms",
    "Time to compute and upsert one daily aggregate, in milliseconds.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
LATE_USAGE_IGNORED = Counter(
    "billing_late_usage_ignored",
    "Late usage events stored and billed nowhere (LATE_USAGE=ignore).",
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


def registry(*collectors: Collector) -> CollectorRegistry:
    """This process's registry, or one that gathers every process's files in multi-process mode;
    plus `collectors` (such as the webhooks' `OutboxCollector`)."""
    return exposition_registry(*collectors)


def render(*collectors: Collector) -> tuple[bytes, str]:
    """The text exposition and its content type, for a `/metrics` endpoint."""
    return generate_latest(registry(*collectors)), CONTENT_TYPE_LATEST


def serve(port: int, addr: str = "0.0.0.0", *collectors: Collector) -> Callable[[], None]:
    """Expose `/metrics` on `port` from a background thread (relay, scheduler); return a
    function that stops it."""
    return serve_exposition(port, addr, *collectors)
