"""Prometheus metrics of the billing scheduler, served by `billing.metrics.serve`.

`python -m workers.scheduler` exposes them on `SCHEDULER_METRICS_PORT` (off by default). With
`PROMETHEUS_MULTIPROC_DIR` set, they are written to that folder like every other process's
(`billing.metrics.registry` gathers them). The workers' own job metrics are Dramatiq's
(`PROMETHEUS=true`).

- `billing_scheduler_fires_total{job, outcome}`: fires run, by outcome — `enqueued` (this
  scheduler won the fire and sent its messages), `skipped` (another run had claimed it),
  `failed` (retried a minute later), `interrupted` (by shutdown; run again at the next start).
- `billing_scheduler_enqueued_total{job}`: messages sent by the fires: (tenant, metric, day)
  aggregations, (tenant, currency) invoices, invoice syncs.
- `billing_scheduler_last_success_timestamp_seconds{job}`: when a fire of the job last enqueued
  its work, for an alert on a scheduler that went quiet.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

from webhooks.metrics import prepare_multiprocess_dir

prepare_multiprocess_dir()  # before the first metric below

SCHEDULER_FIRES = Counter(
    "billing_scheduler_fires", "Scheduler fires run, by job and outcome.", ["job", "outcome"]
)
SCHEDULER_ENQUEUED = Counter(
    "billing_scheduler_enqueued", "Messages the scheduler's fires enqueued, by job.", ["job"]
)
SCHEDULER_LAST_SUCCESS = Gauge(
    "billing_scheduler_last_success_timestamp_seconds",
    "Unix time at which a fire of the job last enqueued its work.",
    ["job"],
    multiprocess_mode="max",
)


def record_fire(job: str, outcome: str) -> None:
    """Count one fire of `job`; an `enqueued` one also stamps the job's last success."""
    SCHEDULER_FIRES.labels(job=job, outcome=outcome).inc()
    if outcome == "enqueued":
        SCHEDULER_LAST_SUCCESS.labels(job=job).set(time.time())
