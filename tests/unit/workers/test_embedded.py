"""What `billing run` starts beside the workers: its relay's settings."""

from __future__ import annotations

from webhooks.settings import WebhookSettings
from workers.embedded import embedded_relay_settings


def test_the_embedded_relay_delivers_to_loopback_by_default(monkeypatch) -> None:
    monkeypatch.delenv("WEBHOOKS_ALLOW_LOOPBACK", raising=False)
    assert WebhookSettings().allow_loopback is False
    assert embedded_relay_settings(WebhookSettings()).allow_loopback is True


def test_an_explicit_webhooks_allow_loopback_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("WEBHOOKS_ALLOW_LOOPBACK", "false")
    assert embedded_relay_settings(WebhookSettings()).allow_loopback is False


def test_the_system_can_stop_right_after_it_starts(tmp_path, monkeypatch) -> None:
    """A stop landing while APScheduler removes its finished catch-up job raised in its thread."""
    import threading

    from billing.settings import BillingSettings
    from workers import actors
    from workers.embedded import start_embedded, stop_embedded
    from workers.settings import WorkerSettings

    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    for attempt in range(3):
        database = BillingSettings(database_url=f"sqlite:///{tmp_path}/run{attempt}.db")
        system = start_embedded(WorkerSettings(), database, threads=1)
        stop_embedded(system)
        actors.unbind()
    assert errors == []
