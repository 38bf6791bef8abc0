"""A FastAPI service whose `/reports` endpoint is limited by each tenant's plan.

Run it from the repository root (on `DATABASE_URL`, the SQLite file `billing.sqlite3` by default):

    billing db upgrade
    billing keys create --operator --scope billing.admin          # prints bk_… (OPERATOR)
    billing keys create --tenant acme --scope billing.read        # prints bk_… (the tenant's)
    uvicorn --app-dir examples quota_service:app --port 8001

With the operator's key (`OP="Authorization: Bearer bk_…"`), give the tenant a plan allowing
3 reports a day and subscribe it (tenants cannot change plans or their own subscriptions):

    curl -X POST localhost:8001/_billing/plans -H "$OP" -H 'Content-Type: application/json' \\
      -d '{"key": "starter", "name": "Starter",
           "entitlements": [{"key": "reports", "limit_per_window": 3, "window": "day"}]}'
    curl -X POST localhost:8001/_billing/subscriptions -H "$OP" \\
      -H 'Content-Type: application/json' -d '{"tenant_id": "acme", "plan_key": "starter"}'

With the tenant's key (`AUTH="Authorization: Bearer bk_…"`),
`curl -X POST localhost:8001/reports -H "$AUTH"` works three times a day; the fourth call
gets 429 (problem+json, with `Retry-After`). A tenant without a subscription is not limited.
"""

from fastapi import Depends, FastAPI

from billing.api import IdempotencyMiddleware, add_billing, register_error_handlers, require_quota

app = FastAPI(title="Reports")
app.add_middleware(IdempotencyMiddleware, store={})  # RedisIdempotencyStore for several processes
register_error_handlers(app)  # every error as RFC 9457 problem+json
add_billing(app)  # the billing API under /_billing, on DATABASE_URL


@app.post("/reports", dependencies=[Depends(require_quota("reports", window="day", consume=1))])
def generate_report() -> dict[str, str]:
    """Make a report: each call uses one of the tenant's daily `reports`."""
    return {"report": "ready"}
