"""The workers' exceptions.

```
WorkerError
├── InvalidPayloadError             a job payload is missing a field, or has an empty or
│                                   badly typed one; permanent: dead-lettered, never run
├── UnknownJobError                 `make_billing_job_handler` got a job name it does not
│                                   know; permanent
├── InvoiceNotFoundError            `billing.sync_invoice` names no stored invoice; permanent
├── ProviderSyncNotConfiguredError  `billing.sync_invoice` ran on a worker without
│                                   `PROVIDER_SYNC`; permanent (the sweep resends it once set)
└── InvalidProviderSyncError        `PROVIDER_SYNC` names no usable hook; raised at boot
```

`workers.jobs.PERMANENT_ERRORS` adds billing's and webhooks' permanent errors to these: that
tuple is what the actors declare as `throws=`. Everything else, `ProviderSyncError` included, is
transient and retried.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the `workers` package raises."""


class InvalidPayloadError(WorkerError, ValueError):
    """A job's payload does not match its contract; the job did not run."""

    def __init__(self, message: str, *, job: str) -> None:
        super().__init__(message)
        self.job = job


class UnknownJobError(WorkerError, LookupError):
    """No job has that name."""


class InvoiceNotFoundError(WorkerError, LookupError):
    """No invoice has the id a `billing.sync_invoice` message names."""


class ProviderSyncNotConfiguredError(WorkerError):
    """A `billing.sync_invoice` job ran where no `PROVIDER_SYNC` is configured."""


class InvalidProviderSyncError(WorkerError, ValueError):
    """`PROVIDER_SYNC` cannot be imported, or is not a hook nor a factory of one."""
