"""The billing workers: Dramatiq actors, the APScheduler process and the `billing` command line.

- `workers.settings`: `WorkerSettings`, read from the environment at a process entry point.
- `workers.broker`: the broker and Dramatiq middleware, chosen in one place.
- `workers.jobs`: one plain function per job; `make_billing_job_handler`.
- `workers.actors`: the actors and `enqueue_*` helpers (importing it builds the broker).
- `workers.scheduler`: `python -m workers.scheduler`, the daily and monthly fan-outs.
- `workers.commands`, `workers.embedded`, `workers.demo`: `billing run|aggregate|invoice|jobs|demo`.

Importing this package touches no broker.
"""
