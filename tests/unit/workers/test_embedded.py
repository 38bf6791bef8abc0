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
