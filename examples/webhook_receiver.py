"""A service receiving billing webhooks: it verifies each delivery, skips repeats, prints it.

Subscribe it, then start it with the secret that `add` printed (run from the repository root):

    billing webhooks add billing.invoice.created http://127.0.0.1:8787/hooks/billing
    WEBHOOK_SECRET=whsec_… uvicorn --app-dir examples webhook_receiver:app --port 8787

Each verified delivery is printed as one JSON line. One whose signature, timestamp or body does
not check out gets 400 (problem+json) and is not printed; a `webhook-id` seen before gets 200
and is not processed again. While a secret rotates, give both: `WEBHOOK_SECRET="whsec_new
whsec_old"`. Without FastAPI, `webhooks.verify(body, headers, secret)` (or any Standard Webhooks
library) checks a delivery the same way.
"""

import json
import os
from typing import Annotated

from fastapi import Depends, FastAPI

from webhooks.receiver import (
    MemoryDedupeStore,
    ReceivedWebhook,
    add_problem_handler,
    webhook_receiver,
)

app = FastAPI(title="Billing webhook receiver")
add_problem_handler(app)  # rejected deliveries get 400 application/problem+json
receive = webhook_receiver(
    os.environ["WEBHOOK_SECRET"].split(),
    dedupe=MemoryDedupeStore(),  # RedisDedupeStore(redis_client) when several processes receive
)


@app.post("/hooks/billing")
def billing_hook(event: Annotated[ReceivedWebhook, Depends(receive)]) -> dict[str, bool]:
    """Handle one verified event (here: print it)."""
    print(json.dumps({"id": event.id, "type": event.type, "data": event.data}), flush=True)
    return {"ok": True}
