"""The workers' exceptions.

```
WorkerError
├── InvalidPayloadError   a job payload is missing a field, or has an empty or badly typed one;
│                         permanent: the message is dead-lettered, never run
└── UnknownJobError       `make_billing_job_handler` was given a job name it does not know;
                          permanent
```

`workers.jobs.PERMANENT_ERRORS` adds billing's and webhooks' permanent errors to these: that
tuple is what the actors declare as `throws=`. Everything else is transient and retried.
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
