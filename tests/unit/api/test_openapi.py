"""The OpenAPI document: every `$ref` resolves, integer bounds are exact integers, and the
error statuses a route can answer are listed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from billing.api.schemas import MAX_BIGINT


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return json.loads(response.content)


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in refs(item)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_ref_resolves(document) -> None:
    found = refs(document)
    assert "#/components/schemas/UsageIn" in found
    for ref in set(found):
        assert resolve(document, ref) is not None, ref


def test_the_amount_maximum_is_the_exact_integer(client, document) -> None:
    amount = document["components"]["schemas"]["UsageIn"]["properties"]["amount"]
    assert (amount["minimum"], amount["maximum"]) == (0, MAX_BIGINT)
    assert isinstance(amount["maximum"], int)
    assert b'"maximum":9223372036854775807' in client.get("/openapi.json").content


def test_each_route_lists_the_errors_it_can_answer(document) -> None:
    for path, operations in document["paths"].items():
        if not path.startswith("/_billing"):
            continue
        for method, operation in operations.items():
            listed = set(operation["responses"])
            assert {"401", "403"} <= listed, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415", "422"} <= listed, (method, path)
