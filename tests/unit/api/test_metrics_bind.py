"""METRICS_BIND: `/metrics` served on a private address by the web process, not on its port."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from billing.api.settings import ApiSettings
from billing.app import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_bind_serves_metrics_there_and_not_on_the_apps_port(
    session_factory, make_key
) -> None:
    port = free_port()
    settings = ApiSettings(metrics_bind=f"127.0.0.1:{port}", metrics_token="ignored-here")
    body = {"metric": "m", "amount": 1, "idempotency_key": "e1"}
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        assert client.get("/metrics").status_code == 404
        client.post("/_billing/usage", json=body, headers=make_key("A"))
        private = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert private.status_code == 200
        assert 'billing_usage_ingest_total{outcome="stored"}' in private.text
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_second_process_finding_the_address_taken_serves_nothing_and_says_so(
    session_factory, caplog
) -> None:
    port = free_port()
    settings = ApiSettings(metrics_bind=f"127.0.0.1:{port}")
    first = TestClient(create_app(settings, session_factory=session_factory))
    second = TestClient(create_app(settings, session_factory=session_factory))
    caplog.set_level(logging.WARNING, logger="billing.app")
    with first, second:
        assert second.get("/metrics").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    assert f"METRICS_BIND 127.0.0.1:{port} is not served by this process" in caplog.text


@pytest.mark.parametrize(
    ("value", "address"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:9100", ("::1", 9100)), ("", None)],
)
def test_metrics_bind_is_host_and_port(monkeypatch, value, address) -> None:
    monkeypatch.setenv("METRICS_BIND", value)
    assert ApiSettings().metrics_address == address


@pytest.mark.parametrize("value", ["9100", "localhost", "127.0.0.1:0", "127.0.0.1:65536", ":9100"])
def test_a_malformed_metrics_bind_is_refused_at_start(monkeypatch, value) -> None:
    monkeypatch.setenv("METRICS_BIND", value)
    with pytest.raises(ValidationError, match="METRICS_BIND must be HOST:PORT"):
        ApiSettings()
