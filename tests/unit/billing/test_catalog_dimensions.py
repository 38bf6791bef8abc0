"""`billing catalog apply / export` with prices per dimension, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from billing import PriceDefinitionError
from billing.catalog import apply_changes, export_catalog, load_catalog, plan_changes
from billing.db import make_session_factory
from billing.errors import CatalogError
from billing.meters import declare_meter
from billing.models import Plan, Price
from workers.cli import main

NOW = datetime(2025, 3, 1, tzinfo=UTC)

CATALOG = """
plans:
  - key: ai
    name: AI
    prices:
      - {key: gpt4, currency: usd, metric: tokens, unit_amount: 3, dimensions: {model: gpt-4}}
      - {key: gpt4-eu, currency: usd, metric: tokens, unit_amount: 5,
         dimensions: {model: gpt-4, region: eu}}
      - {key: rest, currency: usd, metric: tokens, unit_amount: 1}
"""


def apply(session_factory, text: str) -> list[str]:
    with session_factory.begin() as session:
        changes = plan_changes(session, load_catalog(text, "catalog.yaml"), now=NOW)
        apply_changes(session, [c for c in changes if c.action != "absent"])
    return [change.describe() for change in changes]


@pytest.fixture
def declared(session_factory):
    with session_factory.begin() as session:
        declare_meter(session, key="tokens", group_by=["model", "region"])
    return session_factory


def test_dimensions_are_applied_compared_and_exported(declared) -> None:
    described = apply(declared, CATALOG)
    assert described[2] == (
        "+ price gpt4-eu: plan ai, currency usd, metric tokens, unit_amount 5, "
        "billing_scheme per_unit, dimensions {'model': 'gpt-4', 'region': 'eu'}"
    )
    with declared() as session:
        stored = {p.key: p.dimensions for p in session.scalars(select(Price))}
        exported = export_catalog(session)
    assert stored == {
        "gpt4": {"model": "gpt-4"},
        "gpt4-eu": {"model": "gpt-4", "region": "eu"},
        "rest": None,
    }
    assert apply(declared, CATALOG) == []
    assert apply(declared, exported) == []
    moved = apply(declared, CATALOG.replace("{model: gpt-4}}", "{model: o1}}"))
    assert moved == ["~ price gpt4: dimensions {'model': 'gpt-4'} → {'model': 'o1'}"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("dimensions: {model: 4}", "dimensions.model"),
        ("dimensions: {}", "dimensions"),
        ("dimensions: {bad key: a}", "dimensions.bad key.[key]"),
    ],
)
def test_malformed_dimensions_name_the_entry_and_field(change, field) -> None:
    text = CATALOG.replace("dimensions: {model: gpt-4}", change)
    with pytest.raises(CatalogError) as raised:
        load_catalog(text, "catalog.yaml")
    assert (raised.value.entry, raised.value.field) == ("plan 'ai', price 'gpt4'", field)


def test_an_ambiguous_file_is_refused_and_applies_nothing(declared) -> None:
    ambiguous = CATALOG.replace(
        "{key: rest, currency: usd, metric: tokens, unit_amount: 1}",
        ("{key: eu, currency: usd, metric: tokens, unit_amount: 1, dimensions: {region: eu}}"),
    )
    with pytest.raises(PriceDefinitionError, match="names as many properties"):
        apply(declared, ambiguous)
    with declared() as session:
        assert session.scalars(select(Plan)).all() == []


def test_the_command_reports_a_refused_price_in_one_line_exit_2(
    sqlite_engine, monkeypatch, tmp_path, capsys
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "catalog.yaml").write_text(CATALOG)  # no meter groups tokens by model yet
    assert main(["catalog", "apply", "catalog.yaml"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("billing catalog: catalog.yaml: price 'gpt4': dimension 'model' is not")
    session_factory = make_session_factory(sqlite_engine)
    with session_factory.begin() as session:
        assert session.scalars(select(Plan)).all() == []
        declare_meter(session, key="tokens", group_by=["model", "region"])
    assert main(["catalog", "apply", "catalog.yaml"]) == 0
    assert capsys.readouterr().out.endswith("catalog.yaml: 4 changes applied\n")
