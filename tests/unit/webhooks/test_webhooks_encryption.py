"""Secrets encrypted at rest with WEBHOOKS_SECRET_KEY: stored sealed, signed in clear, rotatable."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session, sessionmaker

from billing.migrate import downgrade, upgrade
from webhooks import publish
from webhooks.cli import add_commands
from webhooks.encryption import SecretBox, encrypt_all, reveal
from webhooks.errors import SecretKeyError
from webhooks.models import WebhookSubscription
from webhooks.settings import WebhookSettings
from webhooks.sqltypes import utcnow
from webhooks.store import SqlDeliveryStore
from webhooks.subscriptions import SqlWebhookSubscriptions

TOPIC = "billing.invoice.created"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_KEY, NEW_KEY = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def stored(sessions: sessionmaker[Session]) -> WebhookSubscription:
    with sessions() as session:
        return session.scalars(select(WebhookSubscription)).one()


def test_a_secret_is_stored_encrypted_and_signs_in_clear(session_factory) -> None:
    box = SecretBox([OLD_KEY])
    with session_factory.begin() as session:
        subs = SqlWebhookSubscriptions(session, box=box)
        sub = subs.add(TOPIC, "https://example.test/hook", SECRET)
        assert subs.secret_of(sub) == SECRET
        publish(session, TOPIC, {"tenant_id": "t1", "invoice_id": "i"})
    row = stored(session_factory)
    assert row.secret.startswith("fernet:")
    assert SECRET.removeprefix("whsec_") not in row.secret
    [claimed] = SqlDeliveryStore(session_factory, box=box).claim(10, utcnow(), timedelta(1))
    assert claimed.secrets == (SECRET,)


def test_a_rotated_secret_keeps_both_encrypted_and_signs_with_both(session_factory) -> None:
    box = SecretBox([OLD_KEY])
    with session_factory.begin() as session:
        subs = SqlWebhookSubscriptions(session, box=box)
        sub = subs.add(TOPIC, "https://example.test/hook", SECRET)
        new_secret = subs.rotate_secret(sub.id, grace=timedelta(hours=1))
        publish(session, TOPIC, {"tenant_id": "t1", "invoice_id": "i"})
    row = stored(session_factory)
    assert row.secret.startswith("fernet:")
    assert (row.previous_secret or "").startswith("fernet:")
    [claimed] = SqlDeliveryStore(session_factory, box=box).claim(10, utcnow(), timedelta(1))
    assert claimed.secrets == (new_secret, SECRET)


def test_keys_rotate_old_rows_stay_readable_and_encrypt_secrets_moves_them(
    session_factory,
) -> None:
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session, box=SecretBox([OLD_KEY])).add(
            TOPIC, "https://example.test/hook", SECRET
        )
    both = SecretBox([NEW_KEY, OLD_KEY])
    assert reveal(stored(session_factory).secret, both) == SECRET
    with pytest.raises(SecretKeyError, match="decrypts"):
        reveal(stored(session_factory).secret, SecretBox([NEW_KEY]))
    with session_factory.begin() as session:
        assert encrypt_all(session, both) == 1
    assert reveal(stored(session_factory).secret, SecretBox([NEW_KEY])) == SECRET


def test_rows_stored_without_a_key_are_read_as_they_are_and_can_be_encrypted(
    session_factory,
) -> None:
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session).add(TOPIC, "https://example.test/hook", SECRET)
    box = SecretBox([OLD_KEY])
    assert reveal(stored(session_factory).secret, box) == SECRET
    with session_factory.begin() as session:
        encrypt_all(session, box)
    assert stored(session_factory).secret.startswith("fernet:")
    assert reveal(stored(session_factory).secret, box) == SECRET


def test_an_encrypted_secret_without_the_key_is_a_clear_error(session_factory) -> None:
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session, box=SecretBox([OLD_KEY])).add(
            TOPIC, "https://example.test/hook", SECRET
        )
    with pytest.raises(SecretKeyError, match="set WEBHOOKS_SECRET_KEY"):
        reveal(stored(session_factory).secret, None)


@pytest.mark.parametrize(
    "value", ["not-a-key", "a,b", f"{OLD_KEY},"], ids=["not-a-key", "a,b", "key-and-empty"]
)
def test_a_malformed_key_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_SECRET_KEY", value)
    with pytest.raises(SecretKeyError, match="Fernet keys"):
        WebhookSettings().secret_box()


def test_the_setting_names_the_keys_first_encrypting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WebhookSettings().secret_box() is None
    monkeypatch.setenv("WEBHOOKS_SECRET_KEY", f"{NEW_KEY}, {OLD_KEY}")
    box = WebhookSettings().secret_box()
    assert box is not None
    sealed = box.seal(SECRET)
    assert SecretBox([NEW_KEY]).open(sealed) == SECRET
    assert "WEBHOOKS_SECRET_KEY" not in repr(WebhookSettings())  # a SecretStr


def test_the_cli_adds_encrypted_prints_in_clear_and_encrypts_old_rows(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions.begin() as session:
        SqlWebhookSubscriptions(session).add(TOPIC, "https://example.test/plain", SECRET)
    monkeypatch.setenv("DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WEBHOOKS_SECRET_KEY", OLD_KEY)
    parser = argparse.ArgumentParser(prog="billing")
    add_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args(argv)
        assert args.handler(args) == 0
        return capsys.readouterr().out

    out = run("webhooks", "add", TOPIC, "https://example.test/hook")
    printed = dict(line.split(" ", 1) for line in out.splitlines())["secret"]
    assert printed.startswith("whsec_")
    assert "2 subscriptions' secrets encrypted" in run("webhooks", "encrypt-secrets")
    with sessions() as session:
        rows = {s.url: s.secret for s in session.scalars(select(WebhookSubscription))}
    box = SecretBox([OLD_KEY])
    assert all(value.startswith("fernet:") for value in rows.values())
    assert box.open(rows["https://example.test/hook"]) == printed
    assert box.open(rows["https://example.test/plain"]) == SECRET


def test_the_migration_encrypts_existing_rows_when_the_key_is_set(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    downgrade(engine, "0009_webhooks_claimed_until")
    with engine.begin() as conn:
        conn.execute(
            insert(WebhookSubscription.__table__).values(
                id="s1",
                topic=TOPIC,
                url="https://example.test/hook",
                secret=SECRET,
                enabled=True,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
    monkeypatch.setenv("WEBHOOKS_SECRET_KEY", OLD_KEY)
    upgrade(engine)
    row = stored(sessionmaker(engine))
    assert row.secret.startswith("fernet:")
    assert SecretBox([OLD_KEY]).open(row.secret) == SECRET
    downgrade(engine, "0009_webhooks_claimed_until")  # decrypts them again
    with engine.connect() as conn:
        assert conn.execute(select(WebhookSubscription.__table__.c.secret)).scalar() == SECRET
    upgrade(engine)
