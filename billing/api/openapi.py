"""The OpenAPI document of the billing routes, with integer bounds kept exact.

FastAPI's OpenAPI models hold `minimum`/`maximum` as floats, so the largest amount, 2**63-1,
would be published as 9.223372036854776e18 (which is 2**63, one more than a BIGINT holds).
`install_openapi(app)` makes `app.openapi()` publish the integer bounds of integer schemas as
integers, the BIGINT maximum exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from billing.api.schemas import MAX_BIGINT

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def install_openapi(app: FastAPI) -> None:
    """Wrap `app.openapi` so that its document has exact integer bounds (built once)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = exact_integer_bounds(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def exact_integer_bounds(node: Any) -> Any:
    """`node` with the float bounds of every `"type": "integer"` schema made integers."""
    if isinstance(node, list):
        return [exact_integer_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    fixed = {key: exact_integer_bounds(value) for key, value in node.items()}
    if fixed.get("type") == "integer":
        for bound in _BOUNDS:
            value = fixed.get(bound)
            if isinstance(value, float) and value.is_integer():
                fixed[bound] = MAX_BIGINT if value == float(MAX_BIGINT) else int(value)
    return fixed
