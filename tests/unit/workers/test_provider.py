"""`PROVIDER_SYNC`: a hook or a factory of one, loaded once when a worker process boots."""

from __future__ import annotations

import textwrap

import pytest

from workers import actors
from workers.errors import InvalidProviderSyncError
from workers.provider import load_provider_sync
from workers.settings import WorkerSettings

HOOKS = """
import itertools

from billing.providers import StripeInvoiceSync

factory_calls = itertools.count()


def hook(invoice, lines):
    return "prov_1"


async def async_hook(invoice, lines):
    return "prov_2"


def factory():
    next(factory_calls)
    return hook


def stripe_sync():
    return StripeInvoiceSync(api_key="sk_test", customer_for_tenant=lambda t: "cus_" + t)


class Hooks:
    instance = StripeInvoiceSync(api_key="sk_test", customer_for_tenant=str)


not_callable = 42


def factory_of_nothing():
    return None


def three_arguments(invoice, lines, extra):
    return "x"
"""


@pytest.fixture
def hooks_module(tmp_path, monkeypatch) -> str:
    name = f"billing_hooks_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_hook_is_taken_as_it_is(hooks_module) -> None:
    import importlib

    module = importlib.import_module(hooks_module)
    assert load_provider_sync(f"{hooks_module}:hook") is module.hook
    assert load_provider_sync(f"{hooks_module}:async_hook") is module.async_hook
    assert load_provider_sync(f"{hooks_module}:Hooks.instance") is module.Hooks.instance


def test_a_factory_is_called_once_and_its_hook_returned(hooks_module) -> None:
    import importlib

    from billing.providers import StripeInvoiceSync

    module = importlib.import_module(hooks_module)
    assert load_provider_sync(f"{hooks_module}:factory") is module.hook
    assert next(module.factory_calls) == 1
    assert isinstance(load_provider_sync(f"{hooks_module}:stripe_sync"), StripeInvoiceSync)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("no_such_thing", "has no no_such_thing"),
        ("not_callable", "neither a hook"),
        ("factory_of_nothing", "neither a hook"),
        ("three_arguments", "neither a hook"),
    ],
)
def test_what_is_not_a_hook_is_refused_with_its_name(hooks_module, name, says) -> None:
    with pytest.raises(InvalidProviderSyncError, match=says):
        load_provider_sync(f"{hooks_module}:{name}")


def test_a_missing_module_is_refused() -> None:
    with pytest.raises(InvalidProviderSyncError, match="no_such_module"):
        load_provider_sync("no_such_module:hook")
    with pytest.raises(InvalidProviderSyncError, match="package.module:name"):
        load_provider_sync("no_colon")


def test_the_setting_must_be_an_import_path() -> None:
    from pydantic import ValidationError

    settings = WorkerSettings(provider_sync=" myapp.hooks:stripe ")
    assert settings.provider_sync == "myapp.hooks:stripe"
    for bad in ("myapp.hooks", "myapp:", ":hook", "my app:hook"):
        with pytest.raises(ValidationError):
            WorkerSettings(provider_sync=bad)


def test_the_worker_boot_binds_the_database_and_the_hook(
    hooks_module, sqlite_engine, monkeypatch
) -> None:
    import importlib

    module = importlib.import_module(hooks_module)
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(actors, "settings", WorkerSettings(provider_sync=f"{hooks_module}:factory"))
    actors.unbind()
    try:
        actors.BindDatabaseOnBoot().after_process_boot(actors.broker)
        assert actors._bound().provider_sync is module.hook
    finally:
        actors.unbind()


def test_a_bad_hook_stops_the_worker_at_boot(hooks_module, sqlite_engine, monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(
        actors, "settings", WorkerSettings(provider_sync=f"{hooks_module}:not_callable")
    )
    actors.unbind()
    with pytest.raises(InvalidProviderSyncError):
        actors.BindDatabaseOnBoot().after_process_boot(actors.broker)
    actors.unbind()


def test_billing_run_binds_the_hook_too(hooks_module, tmp_path, monkeypatch) -> None:
    import importlib

    from billing.settings import BillingSettings
    from workers.embedded import start_embedded, stop_embedded

    module = importlib.import_module(hooks_module)
    settings = WorkerSettings(provider_sync=f"{hooks_module}:factory")
    database = BillingSettings(database_url=f"sqlite:///{tmp_path}/run.db")
    system = start_embedded(settings, database, threads=1)  # no relay, no web API
    try:
        assert actors._bound().provider_sync is module.hook
    finally:
        stop_embedded(system)
        actors.unbind()
