"""The public names of `webhooks`, and its independence from `billing` and `workers`."""

from __future__ import annotations

import subprocess
import sys

import webhooks


def test_public_names_are_exported() -> None:
    assert set(webhooks.__all__) >= {
        "publish",
        "verify",
        "WebhookVerificationError",
        "WebhookService",
        "InMemoryOutboxStore",
        "InMemoryWebhookSubscriptions",
    }
    for name in webhooks.__all__:
        assert getattr(webhooks, name).__module__.startswith("webhooks.")


def test_webhooks_imports_neither_billing_nor_workers() -> None:
    modules = [
        "webhooks",
        "webhooks.relay",
        "webhooks.background",
        "webhooks.metrics",
        "webhooks.cli",
        "webhooks.receiver",
        "webhooks.listen",
        "webhooks.replay",
    ]
    code = (
        f"import sys; import {', '.join(modules)}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'billing', 'workers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
