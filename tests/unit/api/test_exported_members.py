"""billing.api's public names resolve, and only those are exported."""

from __future__ import annotations

import pytest

import billing.api


def test_every_exported_name_resolves() -> None:
    for name in billing.api.__all__:
        assert getattr(billing.api, name).__name__ == name


def test_the_seed_s_names_are_exported() -> None:
    seed = {"add_billing", "require_quota", "IdempotencyMiddleware", "register_error_handlers"}
    assert seed <= set(billing.api.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        billing.api.no_such_name  # noqa: B018
