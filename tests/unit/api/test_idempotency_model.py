"""IdempotencyMiddleware against a model, for any sequence of requests (Hypothesis, stateful).

Callers (two keys, the first also spelt `bearer`), idempotency keys, bodies and what the app
answers (a success, a conflict, a validation failure, a server error) are drawn at random.
The model: a (caller, key) whose request ran and concluded (2xx, 409) keeps that request's body
and response; the same body again is replayed without running, another body is a 409; a
validation failure or a server error keeps nothing, so the next request with the key runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from billing.api import IdempotencyMiddleware, register_error_handlers

CALLERS = {"a": "Bearer key-a", "a-lower": "bearer key-a", "b": "Bearer key-b"}
STORED = {201, 409}


@dataclass
class Kept:
    body: str
    status: int
    run: int


class IdempotencyModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        app = FastAPI()
        app.add_middleware(IdempotencyMiddleware, store={})
        register_error_handlers(app)

        @app.post("/things")
        async def things(request: Request) -> JSONResponse:
            self.runs += 1
            status = int(request.headers["x-outcome"])
            return JSONResponse({"run": self.runs}, status_code=status)

        self.client = TestClient(app, raise_server_exceptions=False)
        self.kept: dict[tuple[str, str], Kept] = {}

    @rule(
        caller=st.sampled_from(sorted(CALLERS)),
        key=st.sampled_from(["k1", "k2"]),
        body=st.sampled_from(["x", "y"]),
        outcome=st.sampled_from([201, 409, 422, 500]),
    )
    def post(self, caller: str, key: str, body: str, outcome: int) -> None:
        headers = {
            "Authorization": CALLERS[caller],
            "Idempotency-Key": key,
            "Content-Type": "application/json",
            "X-Outcome": str(outcome),
        }
        runs_before = self.runs
        response = self.client.post("/things", content=f'"{body}"', headers=headers)
        identity = ("a" if caller == "a-lower" else caller, key)
        kept = self.kept.get(identity)
        if kept is not None and kept.body == body:
            assert (response.status_code, response.json()) == (kept.status, {"run": kept.run})
            assert response.headers["idempotent-replayed"] == "true"
            assert self.runs == runs_before
        elif kept is not None:
            assert response.json()["type"] == "urn:billing:problem:idempotency-key-reused"
            assert self.runs == runs_before
        else:
            assert (response.status_code, self.runs) == (outcome, runs_before + 1)
            assert "idempotent-replayed" not in response.headers
            if outcome in STORED:
                self.kept[identity] = Kept(body, outcome, self.runs)

    def teardown(self) -> None:
        self.client.close()


IdempotencyModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
test_the_middleware_behaves_as_its_model = IdempotencyModel.TestCase
