"""Plans as code: `billing catalog apply / export`, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import select

from billing import BillingService
from billing.catalog import apply_changes, export_catalog, load_catalog, plan_changes
from billing.errors import CatalogError
from billing.models import Invoice, InvoiceLine, Plan, PlanEntitlement, Price, Subscription
from workers.cli import main

NOW = datetime(2025, 3, 1, tzinfo=UTC)
JAN, FEB = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC)

CATALOG = """
plans:
  - key: pro
    name: Pro
    entitlements:
      - {key: reports, limit_per_window: 100, window: day}
    prices:
      - {key: pro-fee, currency: usd, unit_amount: 3100, recurring_interval: month}
      - {key: pro-tokens, currency: usd, metric: tokens, unit_amount_decimal: "0.0002"}
      - key: pro-calls
        currency: USD
        metric: calls
        billing_scheme: tiered
        tiers_mode: graduated
        tiers:
          - {up_to: 1000, unit_amount_decimal: "0"}
          - {up_to: null, unit_amount_decimal: "0.1", flat_amount: 50}
  - key: free
    name: Free
    entitlements:
      - {key: reports, limit_per_window: 3, window: day}
"""


def apply(session_factory, text: str) -> list[str]:
    with session_factory.begin() as session:
        changes = plan_changes(session, load_catalog(text, "catalog.yaml"), now=NOW)
        apply_changes(session, [c for c in changes if c.action != "absent"])
    return [change.describe() for change in changes]


def snapshot(session_factory) -> list[tuple]:
    with session_factory() as session:
        prices = session.execute(
            select(Price.id, Price.key, Price.plan_id, Price.unit_amount, Price.currency)
        ).all()
        entitlements = session.execute(
            select(PlanEntitlement.key, PlanEntitlement.limit_per_window)
        ).all()
        plans = session.execute(select(Plan.id, Plan.key, Plan.name)).all()
    return sorted(map(tuple, prices)) + sorted(map(tuple, entitlements)) + sorted(plans)


def test_applying_a_catalogue_twice_changes_nothing_the_second_time(session_factory) -> None:
    first = apply(session_factory, CATALOG)
    assert [line.split(":")[0] for line in first] == [
        "+ plan pro",
        "+ price pro-fee",
        "+ price pro-tokens",
        "+ price pro-calls",
        "+ plan free",
    ]
    before = snapshot(session_factory)
    assert apply(session_factory, CATALOG) == []
    assert snapshot(session_factory) == before
    with session_factory() as session:
        calls = session.scalars(select(Price).where(Price.key == "pro-calls")).one()
        assert (calls.currency, calls.tiers[1]["flat_amount"]) == ("usd", 50)


def test_an_export_applied_to_an_empty_database_reproduces_the_catalogue(
    session_factory, sqlite_template, tmp_path
) -> None:
    import shutil

    from billing.db import make_engine, make_session_factory

    apply(session_factory, CATALOG)
    with session_factory() as session:
        exported = export_catalog(session)
    shutil.copy(sqlite_template, tmp_path / "elsewhere.sqlite3")
    engine = make_engine(f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}")
    elsewhere = make_session_factory(engine)
    assert len(apply(elsewhere, exported)) == 5
    with elsewhere() as session:
        assert export_catalog(session) == exported
    engine.dispose()
    assert apply(session_factory, exported) == []  # the export is what the database holds


def test_a_price_nothing_uses_is_changed_in_place(session_factory) -> None:
    apply(session_factory, CATALOG)
    with session_factory() as session:
        before = session.scalars(select(Price.id).where(Price.key == "pro-fee")).one()
    changed = CATALOG.replace("unit_amount: 3100", "unit_amount: 3500")
    assert apply(session_factory, changed) == ["~ price pro-fee: unit_amount 3100 → 3500"]
    with session_factory() as session:
        row = session.scalars(select(Price).where(Price.key == "pro-fee")).one()
        assert (row.id, row.unit_amount) == (before, 3500)


def invoice_january(session_factory) -> str:
    with session_factory.begin() as session:
        plan = session.scalars(select(Plan).where(Plan.key == "pro")).one()
        session.add(Subscription(tenant_id="acme", plan_id=plan.id, effective_at=JAN, ended_at=FEB))
        service = BillingService(session=session, tenant_id="acme")
        service.record_usage(metric="tokens", amount=1_000_000, at=JAN, idempotency_key="t")
        return service.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")


def test_a_price_an_open_invoice_bills_gets_a_new_version_and_the_invoice_keeps_its_own(
    session_factory,
) -> None:
    apply(session_factory, CATALOG)
    invoice_id = invoice_january(session_factory)
    with session_factory() as session:
        old_id = session.scalars(select(Price.id).where(Price.key == "pro-tokens")).one()
    changed = CATALOG.replace('"0.0002"', '"0.0003"')
    [line] = apply(session_factory, changed)
    assert line.startswith("~ price pro-tokens: unit_amount_decimal 0.0002 → 0.0003; a new version")
    assert "invoice bills it; the old one is kept as pro-tokens@v1)" in line
    with session_factory() as session:
        old = session.get(Price, old_id)
        new = session.scalars(select(Price).where(Price.key == "pro-tokens")).one()
        assert (old.key, old.plan_id, old.unit_amount_decimal) == (
            "pro-tokens@v1",
            None,
            Decimal("0.0002"),
        )
        assert new.id != old_id
        assert new.plan_id is not None
        assert new.unit_amount_decimal == Decimal("0.0003")
        line_row = session.scalars(
            select(InvoiceLine).where(
                InvoiceLine.invoice_id == invoice_id, InvoiceLine.metric == "tokens"
            )
        ).one()
        assert (line_row.price_id, line_row.amount) == (old_id, 200)  # 1,000,000 × 0.0002¢
        assert session.get(Invoice, invoice_id).total_amount == 3100 + 200
    assert apply(session_factory, changed) == []  # applied again: no third version
    again = changed.replace('"0.0003"', '"0.0004"')  # the new version bills nothing yet
    assert apply(session_factory, again) == [
        "~ price pro-tokens: unit_amount_decimal 0.0003 → 0.0004"
    ]


def test_a_price_a_live_subscription_holds_gets_a_new_version(session_factory) -> None:
    apply(session_factory, CATALOG)
    with session_factory.begin() as session:
        plan = session.scalars(select(Plan).where(Plan.key == "pro")).one()
        session.add(Subscription(tenant_id="acme", plan_id=plan.id, effective_at=JAN))
    [line] = apply(session_factory, CATALOG.replace("unit_amount: 3100", "unit_amount: 3500"))
    assert "a live subscription's plan holds it; the old one is kept as pro-fee@v1" in line
    with session_factory() as session:
        keys = sorted(session.scalars(select(Price.key).where(Price.plan_id.is_not(None))))
    assert keys == ["pro-calls", "pro-fee", "pro-tokens"]  # the plan bills one fee


def test_entitlements_and_names_change_in_place(session_factory) -> None:
    apply(session_factory, CATALOG)
    changed = CATALOG.replace("name: Free", "name: Free forever").replace(
        "limit_per_window: 3,", "limit_per_window: 5,"
    )
    assert apply(session_factory, changed) == [
        "~ plan free: name Free → Free forever, entitlements [reports 3/day] → [reports 5/day]"
    ]


def test_plans_and_prices_missing_from_the_file_are_reported_and_left_alone(
    session_factory,
) -> None:
    apply(session_factory, CATALOG)
    only_free = "plans:\n" + CATALOG.split("  - key: free\n")[1].join(["  - key: free\n", ""])
    lines = apply(session_factory, only_free)
    assert "? plan pro: not in the file: left as it is" in lines
    assert "? price pro-fee: not in the file: left as it is" in lines
    with session_factory() as session:
        assert len(session.scalars(select(Price)).all()) == 3


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (
            CATALOG.replace('"0.0002"', "0.0002"),
            "catalog.yaml: plan 'pro', price 'pro-tokens': unit_amount_decimal: write decimal "
            "amounts as strings",
        ),
        (
            CATALOG.replace("unit_amount: 3100", "unit_amount: -1"),
            "catalog.yaml: plan 'pro', price 'pro-fee': unit_amount: ",
        ),
        (
            CATALOG.replace(
                "recurring_interval: month}", "recurring_interval: month, colour: red}"
            ),
            "catalog.yaml: plan 'pro', price 'pro-fee': colour: Extra inputs are not permitted",
        ),
        (
            CATALOG.replace("tiers_mode: graduated", "tiers_mode: null"),
            "catalog.yaml: plan 'pro', price 'pro-calls': a tiered price needs tiers_mode",
        ),
        (
            CATALOG.replace("window: day}\n    prices", "window: week}\n    prices"),
            "catalog.yaml: plan 'pro', entitlement 'reports': window: Input should be 'day'",
        ),
        (CATALOG.replace("key: free", "key: pro"), "catalog.yaml: the document: plan key 'pro'"),
        (CATALOG + "  - [", "catalog.yaml: line "),
    ],
)
def test_validation_errors_name_the_file_the_entry_and_the_field(broken, message) -> None:
    with pytest.raises(CatalogError) as raised:
        load_catalog(broken, "catalog.yaml")
    assert str(raised.value).startswith(message)


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def cli(sqlite_engine, monkeypatch, tmp_path):
    from billing.db import make_session_factory

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    monkeypatch.chdir(tmp_path)
    return make_session_factory(sqlite_engine)


def test_dry_run_prints_the_diff_and_changes_nothing(cli, capsys) -> None:
    assert main(["catalog", "apply", "catalog.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "+ plan pro: Pro, entitlements [reports 100/day]"
    assert out[3].startswith("+ price pro-calls: plan pro, currency usd, metric calls")
    assert "tiers [up to 1000 at 0 + 0; rest at 0.1 + 50]" in out[3]
    assert out[-1] == "catalog.yaml: 5 changes (dry run: none made)"
    with cli() as session:
        assert session.scalars(select(Plan)).all() == []


def test_apply_then_apply_again_then_export(cli, capsys, tmp_path) -> None:
    assert main(["catalog", "apply", "catalog.yaml"]) == 0
    assert capsys.readouterr().out.endswith("catalog.yaml: 5 changes applied\n")
    assert main(["catalog", "apply", "catalog.yaml"]) == 0
    assert capsys.readouterr().out == "catalog.yaml: no changes\n"
    assert main(["catalog", "export", "exported.yaml"]) == 0
    assert "pro-tokens" in (tmp_path / "exported.yaml").read_text()
    capsys.readouterr()
    assert main(["catalog", "apply", "exported.yaml"]) == 0
    assert capsys.readouterr().out == "exported.yaml: no changes\n"


def test_a_broken_file_is_one_line_exit_2_and_applies_nothing(cli, capsys, tmp_path) -> None:
    (tmp_path / "catalog.yaml").write_text(CATALOG.replace("unit_amount: 3100", "unit_amount: x"))
    assert main(["catalog", "apply", "catalog.yaml"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "billing catalog: catalog.yaml: plan 'pro', price 'pro-fee': unit_amount"
    )
    assert main(["catalog", "apply", "missing.yaml"]) == 2
    assert "cannot read missing.yaml" in capsys.readouterr().err
    with cli() as session:
        assert session.scalars(select(Plan)).all() == []
