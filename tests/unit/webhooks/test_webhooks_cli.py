"""`billing webhooks …` commands, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from webhooks import InMemoryWebhookSubscriptions, publish
from webhooks.cli import add_commands
from webhooks.delivery import event_body
from webhooks.errors import DuplicateSubscriptionError
from webhooks.listen import make_listen_app
from webhooks.models import WebhookDelivery, WebhookSubscription
from webhooks.signing import signature_headers

TOPIC = "billing.usage_aggregated"
PAYLOAD = {
    "tenant_id": "t1",
    "metric": "tokens",
    "day_start": "2025-01-01T00:00:00+00:00",
    "total": 1,
}


@pytest.fixture
def run(engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("DATABASE_URL", engine.url.render_as_string(hide_password=False))

    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="billing")
        add_commands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        code = args.handler(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def added(run, *extra: str) -> tuple[str, str]:
    code, out, _ = run("webhooks", "add", TOPIC, "https://example.test/hook", *extra)
    assert code == 0
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    return lines["subscription"].split()[0], lines["secret"]


def test_add_prints_the_id_and_a_generated_secret_once(run, factory) -> None:
    sub_id, secret = added(run, "--tenant", "t1")
    assert secret.startswith("whsec_")
    with factory() as session:
        sub = session.get(WebhookSubscription, sub_id)
        assert (sub.topic, sub.url, sub.tenant_id, sub.secret, sub.enabled) == (
            TOPIC,
            "https://example.test/hook",
            "t1",
            secret,
            True,
        )
    _, out, _ = run("webhooks", "list")
    assert secret not in out


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.test/",
        "not a url",
        "/relative",
        "https://user:pass@example.test/hook",
        "https://token@example.test/hook",
        "https://example.test:0/hook",
        "https://example.test:65536/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/hook",
        "http://[fd00:ec2::254]/hook",
        "http://[::ffff:169.254.169.254]/hook",
        "http://224.0.0.1/hook",
    ],
)
def test_add_refuses_a_bad_url_and_stores_nothing(run, factory, url: str) -> None:
    code, out, err = run("webhooks", "add", TOPIC, url)
    assert code == 1
    assert "InvalidSubscriptionError" in err
    with factory() as session:
        assert session.scalars(select(WebhookSubscription)).all() == []


def test_list_shows_every_subscription(run) -> None:
    first, _ = added(run)
    second, _ = added(run, "--tenant", "t2")
    code, out, _ = run("webhooks", "list", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(r["id"], r["tenant_id"], r["enabled"]) for r in rows] == [
        (first, None, True),
        (second, "t2", True),
    ]


def test_disable_and_enable(run, factory) -> None:
    sub_id, _ = added(run)
    assert run("webhooks", "disable", sub_id, "--reason", "moving house")[0] == 0
    with factory() as session:
        sub = session.get(WebhookSubscription, sub_id)
        assert (sub.enabled, sub.disabled_reason) == (False, "moving house")
    assert run("webhooks", "enable", sub_id)[0] == 0
    with factory() as session:
        assert session.get(WebhookSubscription, sub_id).enabled is True


def test_unknown_subscription_exits_1(run) -> None:
    code, _, err = run("webhooks", "disable", "nope")
    assert code == 1
    assert "SubscriptionNotFoundError" in err


def test_rotate_secret_keeps_the_old_one_for_the_grace(run, factory) -> None:
    sub_id, old = added(run)
    before = datetime.now(UTC)
    code, out, _ = run("webhooks", "rotate-secret", sub_id, "--grace", "2h")
    new = out.split()[-1]
    assert code == 0
    assert new.startswith("whsec_")
    assert new != old
    with factory() as session:
        sub = session.get(WebhookSubscription, sub_id)
        assert (sub.secret, sub.previous_secret) == (new, old)
        assert before + timedelta(hours=2) <= sub.previous_secret_expires_at
        assert sub.previous_secret_expires_at <= datetime.now(UTC) + timedelta(hours=2)


def test_deliveries_filters_by_status(run, factory) -> None:
    sub_id, _ = added(run)
    with factory.begin() as session:
        dead_event = publish(session, TOPIC, PAYLOAD)
        publish(session, TOPIC, PAYLOAD)
        session.execute(
            WebhookDelivery.__table__.update()
            .where(WebhookDelivery.event_id == dead_event)
            .values(status="dead", attempts=10, last_error="HTTP 500")
        )
    code, out, _ = run("webhooks", "deliveries", "--status", "dead", "--json")
    [row] = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert (row["event_id"], row["status"], row["last_error"], row["topic"]) == (
        dead_event,
        "dead",
        "HTTP 500",
        TOPIC,
    )
    _, out, _ = run("webhooks", "deliveries", "--subscription", sub_id)
    header, rule, *rows = out.splitlines()
    assert header.split()[:4] == ["id", "event_id", "topic", "subscription_id"]
    assert set(rule.strip()) == {"─"}
    assert len(rows) == 2
    assert all(row.split()[2:4] == [TOPIC, sub_id] for row in rows)


def test_replay_requeues_a_dead_delivery_from_attempt_one(run, factory) -> None:
    added(run)
    with factory.begin() as session:
        event_id = publish(session, TOPIC, PAYLOAD)
        session.execute(
            WebhookDelivery.__table__.update().values(status="dead", attempts=10, last_error="x")
        )
    code, out, _ = run("webhooks", "replay", event_id)
    assert (code, out.strip()) == (0, "1 deliveries queued")
    with factory() as session:
        [row] = session.scalars(select(WebhookDelivery)).all()
        assert (row.status, row.attempts, row.last_error) == ("pending", 0, None)
        assert row.next_attempt_at <= datetime.now(UTC)


def test_replay_since_reaches_a_subscription_added_later(run, factory) -> None:
    with factory.begin() as session:
        publish(session, TOPIC, PAYLOAD)  # nobody listens yet: kept
        publish(session, TOPIC, PAYLOAD)
        publish(session, "billing.invoice.created", {"tenant_id": "t1"})
    sub_id, _ = added(run)
    code, out, _ = run("webhooks", "replay", "--since", "1h", "--subscription", sub_id)
    assert (code, out.strip()) == (0, "2 deliveries queued")
    with factory() as session:
        rows = session.scalars(select(WebhookDelivery)).all()
        assert {(r.subscription_id, r.status) for r in rows} == {(sub_id, "pending")}
        assert len(rows) == 2


def test_replay_twice_keeps_one_delivery_per_subscription(run, factory) -> None:
    added(run)
    with factory.begin() as session:
        event_id = publish(session, TOPIC, PAYLOAD)
    run("webhooks", "replay", event_id)
    run("webhooks", "replay", event_id)
    with factory() as session:
        assert len(session.scalars(select(WebhookDelivery)).all()) == 1


def test_replay_of_an_unknown_event_exits_1(run) -> None:
    code, _, err = run("webhooks", "replay", "nope")
    assert code == 1
    assert "EventNotFoundError" in err


def test_replay_since_needs_an_offset(run) -> None:
    with pytest.raises(SystemExit):
        run("webhooks", "replay", "--since", "2025-01-01T00:00:00")


def test_listen_prints_verified_deliveries_and_reports_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    client = TestClient(make_listen_app([secret]))
    body = event_body(TOPIC, PAYLOAD, datetime(2025, 1, 1, tzinfo=UTC))
    headers = signature_headers([secret], "evt_9", int(datetime.now(UTC).timestamp()), body)
    assert client.post("/anything", content=body, headers=headers).status_code == 200
    assert client.post("/anything", content=body, headers=headers).status_code == 200
    assert client.post("/anything", content=body + b" ", headers=headers).status_code == 400
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    assert json.loads(line) == {
        "id": "evt_9",
        "type": TOPIC,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "data": PAYLOAD,
    }
    assert "duplicate delivery evt_9" in err
    assert "400 evt_9" in err


def test_a_database_without_the_schema_is_reported_not_dumped(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.cli import main

    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{empty}")
    assert main(["webhooks", "list"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("has no billing tables: run `billing db upgrade`")


def test_add_subscribes_a_url_to_several_topics_under_one_secret(run, factory) -> None:
    code, out, _ = run(
        "webhooks", "add", TOPIC, "billing.invoice.created", TOPIC, "https://example.test/hook"
    )
    assert code == 0
    *subscribed, secret_line = out.splitlines()
    secret = secret_line.removeprefix("secret ")
    assert [line.split()[2] for line in subscribed] == [TOPIC, "billing.invoice.created"]
    with factory() as session:
        rows = session.scalars(select(WebhookSubscription)).all()
    assert sorted((row.topic, row.secret) for row in rows) == [
        ("billing.invoice.created", secret),
        (TOPIC, secret),
    ]


def test_list_is_a_table_with_headers_that_shows_urls_escaped(run, factory) -> None:
    first, _ = added(run)
    with factory.begin() as session:
        session.get(
            WebhookSubscription, first
        ).disabled_reason = "[bold]gone[/bold]\x1b[31m\nforged"
    code, out, _ = run("webhooks", "list")
    assert code == 0
    header, _rule, row = out.splitlines()
    assert header.split() == [
        "id", "topic", "url", "tenant_id", "enabled", "disabled_reason", "failing_since",
        "created_at",
    ]  # fmt: skip
    assert row.split()[:5] == [first, TOPIC, "https://example.test/hook", "-", "True"]
    assert "[bold]gone[/bold]\\x1b[31m\\nforged" in row  # not markup, not a control
    assert header.index("url") == row.index("https://")  # aligned


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://user:pass@example.test/hook", "credentials"),
        ("https://example.test:70000/hook", "port 70000"),
        ("http://169.254.169.254/", "link-local or cloud metadata"),
        ("http://[ff02::1]/", "multicast"),
    ],
)
def test_add_says_why_a_url_can_never_be_delivered_to(run, url: str, reason: str) -> None:
    code, _, err = run("webhooks", "add", TOPIC, url)
    assert code == 1
    assert reason in err


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hook", "http://10.0.0.1/hook", "https://example.test:65535/"]
)
def test_add_accepts_addresses_a_setting_may_allow(run, url: str) -> None:
    code, out, err = run("webhooks", "add", TOPIC, url)
    assert (code, err.count("error")) == (0, 0)


GIVEN = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def stored_secret(factory, sub_id: str) -> str:
    with factory() as session:
        sub = session.get(WebhookSubscription, sub_id)
        assert sub is not None
        return sub.secret


def test_add_reads_the_secret_from_a_file(run, factory, tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text(GIVEN + "\n")
    sub_id, secret = added(run, "--secret-file", str(path))
    assert secret == GIVEN == stored_secret(factory, sub_id)


def test_add_reads_the_secret_from_the_environment(run, factory, monkeypatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", GIVEN)
    sub_id, secret = added(run, "--secret-env", "HOOK_SECRET")
    assert secret == GIVEN == stored_secret(factory, sub_id)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--secret-env", "UNSET_SECRET"], "UNSET_SECRET holds no secret"),
        (["--secret", "whsec_" + "QUFB" * 7], "at least 24"),  # 21 bytes
        (["--secret", "whsec_not base64!"], "not base64"),
        (["--secret", GIVEN, "--secret", GIVEN], "give one secret"),
    ],
)
def test_add_refuses_a_missing_or_weak_secret_and_stores_nothing(
    run, factory, argv: list[str], reason: str
) -> None:
    code, _, err = run("webhooks", "add", TOPIC, "https://example.test/hook", *argv)
    assert code == 1
    assert reason in err
    with factory() as session:
        assert session.scalars(select(WebhookSubscription)).all() == []


def test_listen_verifies_with_the_secrets_of_a_file(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    rotated = "whsec_" + "QUJD" * 8
    path = tmp_path / "secrets"
    path.write_text(f"{GIVEN}\n\n{rotated}\n")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    parser = argparse.ArgumentParser(prog="billing")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["webhooks", "listen", "--secret-file", str(path)])
    assert args.handler(args) == 0
    client = TestClient(served[0])
    body = event_body(TOPIC, PAYLOAD, datetime(2025, 1, 1, tzinfo=UTC))
    now = int(datetime.now(UTC).timestamp())
    for event_id, secret in [("evt_old", GIVEN), ("evt_new", rotated)]:
        headers = signature_headers([secret], event_id, now, body)
        assert client.post("/hook", content=body, headers=headers).status_code == 200
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [
        "evt_old",
        "evt_new",
    ]


def test_listen_without_a_secret_says_how_to_give_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="billing")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["webhooks", "listen"])
    assert args.handler(args) == 2
    assert "--secret-file" in capsys.readouterr().err


@pytest.mark.parametrize("tenant", [[], ["--tenant", "t1"]])
def test_a_second_subscription_of_the_same_tenant_topic_and_url_is_refused_with_the_first_id(
    run, factory, tenant: list[str]
) -> None:
    first, _ = added(run, *tenant)
    run("webhooks", "disable", first)  # disabled or not, it still exists
    code, out, err = run("webhooks", "add", TOPIC, "https://example.test/hook", *tenant)
    assert code == 1
    assert "DuplicateSubscriptionError" in err
    assert first in err
    with factory() as session:
        assert session.scalars(select(WebhookSubscription.id)).all() == [first]


def test_another_tenant_topic_or_url_is_another_subscription(run, factory) -> None:
    added(run)
    added(run, "--tenant", "t1")
    added(run, "--tenant", "t2")
    code, _, _ = run("webhooks", "add", "billing.invoice.created", "https://example.test/hook")
    assert code == 0
    code, _, _ = run("webhooks", "add", TOPIC, "https://example.test/other")
    assert code == 0
    with factory() as session:
        assert len(session.scalars(select(WebhookSubscription.id)).all()) == 5


def test_in_memory_subscriptions_refuse_a_duplicate_with_the_first_id() -> None:
    subs = InMemoryWebhookSubscriptions()
    first = subs.add(TOPIC, "https://example.test/hook", tenant_id="t1")
    with pytest.raises(DuplicateSubscriptionError) as refused:
        subs.add(TOPIC, "https://example.test/hook", tenant_id="t1")
    assert refused.value.existing_id == first.id
    assert [s.id for s in subs.all()] == [first.id]


HOSTILE = "HTTP 500: \x1b[2J\x1b]0;owned\x07forged\nline \u202eevil"


@pytest.mark.parametrize("as_json", [False, True])
def test_deliveries_never_print_a_subscribers_answer_raw(run, factory, as_json: bool) -> None:
    added(run)
    with factory.begin() as session:
        publish(session, TOPIC, PAYLOAD)
        session.execute(WebhookDelivery.__table__.update().values(last_error=HOSTILE))
    code, out, _ = run("webhooks", "deliveries", *(["--json"] if as_json else []))
    assert code == 0
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "\x07" not in out
    lines = out.splitlines()
    assert len(lines) == (1 if as_json else 3)  # (a header and its rule,) one row: not forged
    line = lines[-1]
    if as_json:
        assert json.loads(line)["last_error"] == HOSTILE  # escaped, not altered
    else:
        assert "\\x1b[2J" in line
        assert "forged\\nline" in line


def test_list_and_errors_never_print_a_url_raw(run, factory) -> None:
    with factory.begin() as session:
        session.add(
            WebhookSubscription(
                topic=TOPIC, url="https://x.test/\x1b[31mred", secret=GIVEN, enabled=False
            )
        )
    _, out, _ = run("webhooks", "list")
    assert "\x1b" not in out
    assert "\\x1b[31mred" in out
    code, _, err = run("webhooks", "enable", "\x1b[2Jnot-an-id")
    assert code == 1
    assert "\x1b" not in err
