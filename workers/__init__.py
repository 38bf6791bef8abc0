"""The billing workers: Dramatiq actors, the APScheduler process and the `billing` command line.

- `workers.settings`: `WorkerSettings`, read from the environment at a process entry point.
- `workers.broker`: the broker and Dramatiq middleware, chosen in one place.
- `workers.jobs`: one plain function per job; `make_billing_job_handler`.
- `workers.actors`: the actors and `enqueue_*` helpers (importing it builds the broker).
- `workers.provider`: loads the payment provider hook `PROVIDER_SYNC` names.
- `workers.scheduler`: `python -m workers.scheduler`, the daily and monthly fan-outs and the sweep
  of unsynced invoices; `workers.metrics`, its Prometheus counters.
- `workers.logs`: the one line per job, and JSON logs (`LOG_FORMAT=json`).
- `workers.status`, `workers.status_view`: `billing status`, the health summary.
- `workers.commands`, `workers.embedded`, `workers.demo`:
  `billing run|aggregate|invoice|jobs|status|demo`.

Importing this package touches no broker.
"""
