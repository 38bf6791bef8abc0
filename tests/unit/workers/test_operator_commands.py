"""The operator's commands: failures in one line (what is wrong, what to do; exit 2, nothing
stored), `db upgrade`'s report, dead letters requeued or purged, backfills that sync invoices."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import fakeredis
import pytest
from dramatiq import Worker
from sqlalchemy import create_engine, select

from billing.db import make_session_factory
from billing.models import Invoice, Plan, Price, Subscription
from workers import actors
from workers.broker import QUEUE_NAME, build_broker
from workers.cli import main
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)

DATABASE_COMMANDS = [
    ["keys", "create", "--tenant", "acme", "--scope", "billing.read"],
    ["keys", "list"],
    ["aggregate", "--from", "2025-01-01", "--to", "2025-01-02", "--inline"],
    ["invoice", "--period", "2025-01", "--inline"],
    ["webhooks", "list"],
    ["status"],
]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("command", [*DATABASE_COMMANDS, ["db", "upgrade"]])
def test_a_malformed_database_url_is_one_line_and_exit_2(command, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres//nowhere")
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert "DATABASE_URL is not a database URL" in line


@pytest.mark.parametrize("command", [*DATABASE_COMMANDS, ["db", "upgrade"]])
def test_an_unreachable_database_is_one_line_and_exit_2(command, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://billing:s3cret@127.0.0.1:1/billing")
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot use the database at postgresql://billing:***@127.0.0.1:1/billing" in line
    assert "s3cret" not in line


@pytest.mark.parametrize("command", DATABASE_COMMANDS)
def test_a_missing_default_sqlite_file_is_refused_and_not_created(
    command, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert f"no database at {tmp_path / 'billing.sqlite3'}" in line
    assert "relative to this folder" in line
    assert "`billing db upgrade`" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", DATABASE_COMMANDS)
def test_a_database_never_migrated_says_run_billing_db_upgrade(
    command, tmp_path, monkeypatch, capsys
) -> None:
    empty = tmp_path / "empty.sqlite3"
    create_engine(f"sqlite:///{empty}").connect().close()  # an empty file
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{empty}")
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert line.endswith("has no billing tables: run `billing db upgrade`")


@pytest.mark.postgres
def test_a_postgresql_database_never_migrated_says_run_billing_db_upgrade(
    pg_database, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_database("unmigrated"))
    assert main(["keys", "list"]) == 2
    assert one_line(capsys.readouterr().err).endswith("run `billing db upgrade`")


def test_db_upgrade_reports_what_it_applied_then_that_nothing_was_left(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'new.sqlite3'}")
    assert main(["db", "upgrade"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("applied 0001")
    assert "is now at " in first
    assert main(["db", "upgrade"]) == 0
    second = capsys.readouterr().out
    assert "was already up to date at " in second
    assert "applied" not in second


# --- Redis down ---------------------------------------------------------------------------


@pytest.fixture
def redis_down():
    """The actors on a RedisBroker whose server does not answer (nothing listens on port 1)."""
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0", namespace="down")
    broker = build_broker(settings)
    previous = actors.attach(broker, settings=settings)
    yield broker
    actors.attach(previous, settings=actors.settings)


@pytest.fixture
def subscribed(sqlite_engine, monkeypatch):
    """The CLI's database holds one tenant subscribed since January 2025."""
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    factory = make_session_factory(sqlite_engine)
    with factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(Price(plan_id=plan.id, key="fee", currency="usd", unit_amount=500))
        session.add(Subscription(tenant_id="acme", plan_id=plan.id, effective_at=JAN))
    return factory


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command",
    [["jobs"], ["jobs", "requeue", "--all"], ["invoice", "--period", "2025-01"]],
)
def test_with_redis_down_interactive_commands_fail_in_one_line(
    command, subscribed, redis_down, capsys
) -> None:
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"billing {command[0]}: cannot reach Redis: ")
    assert "check REDIS_URL" in line


def test_wait_keeps_the_schedulers_patience_for_scripts(subscribed) -> None:
    from workers.commands import backfill_settings

    patient = WorkerSettings(enqueue_retry_for=600)
    assert backfill_settings(patient, wait=True).enqueue_retry_for.total_seconds() == 600
    assert backfill_settings(patient, wait=False).enqueue_retry_for.total_seconds() <= 5


# --- dead letters -------------------------------------------------------------------------


@pytest.fixture
def dead_letters(sqlite_engine, monkeypatch):
    """Three dead letters on a RedisBroker over fakeredis (payloads the jobs refuse at once)."""
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    settings = WorkerSettings(namespace="cli")
    broker = build_broker(settings, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    previous = actors.attach(broker, settings=settings)
    actors.bind(make_session_factory(sqlite_engine))
    worker = Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        sent = [actors.aggregate_daily.send({"tenant_id": f"t{n}"}) for n in range(3)]
        broker.join(QUEUE_NAME, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        actors.unbind()
    yield broker, [message.message_id for message in sent]
    actors.attach(previous, settings=actors.settings)


def dead(broker) -> int:
    return broker.client.zcard(f"cli:{QUEUE_NAME}.XQ")


def test_requeue_sends_one_dead_letter_again_as_new(dead_letters, capsys) -> None:
    broker, ids = dead_letters
    assert main(["jobs", "requeue", ids[1]]) == 0
    assert capsys.readouterr().out.strip() == f"requeued {ids[1]}"
    assert dead(broker) == 2
    [queued] = broker.client.hvals(f"cli:{QUEUE_NAME}.msgs")
    from dramatiq import Message

    message = Message.decode(queued)
    assert (message.message_id, message.args) == (ids[1], ({"tenant_id": "t1"},))
    assert not {"retries", "traceback"} & set(message.options)


def test_requeue_all_and_purge_all_empty_the_dead_letters(dead_letters, capsys) -> None:
    broker, ids = dead_letters
    assert main(["jobs", "purge", ids[0]]) == 0
    assert dead(broker) == 2
    assert main(["jobs", "requeue", "--all"]) == 0
    assert "requeued 2 dead letters" in capsys.readouterr().out
    assert (dead(broker), broker.client.llen(f"cli:{QUEUE_NAME}")) == (0, 2)
    assert main(["jobs", "purge", "--all"]) == 0
    assert "purged 0 dead letters" in capsys.readouterr().out


def test_an_unknown_dead_letter_id_changes_nothing(dead_letters, capsys) -> None:
    broker, ids = dead_letters
    assert main(["jobs", "purge", ids[0], "no-such-id"]) == 2
    assert "no dead letter with id no-such-id" in one_line(capsys.readouterr().err)
    assert dead(broker) == 3


def test_requeue_needs_an_id_or_all(dead_letters, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", "requeue"])
    assert "an ID or --all" in capsys.readouterr().err


# --- provider sync -------------------------------------------------------------------------

HOOK = """
def hook(invoice, lines):
    with open({calls!r}, "a") as calls:
        calls.write(invoice.id + "\\n")
    return f"prov_{{invoice.id}}_{{sum(line.amount for line in lines)}}"
"""


@pytest.mark.parametrize("inline", [["--inline"], []])  # [] : the embedded default, no broker
def test_an_invoice_backfill_run_here_reaches_the_provider(
    inline, subscribed, stub_broker, tmp_path, monkeypatch, capsys
) -> None:
    module = f"hooks_{tmp_path.name.replace('-', '_')}"
    calls = tmp_path / "calls.txt"
    (tmp_path / f"{module}.py").write_text(HOOK.format(calls=str(calls)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PROVIDER_SYNC", f"{module}:hook")
    assert main(["invoice", "--period", "2025-01", *inline]) == 0
    assert "ran 1, failed 0" in capsys.readouterr().out
    with subscribed() as session:
        invoice = session.execute(select(Invoice)).scalar_one()
    assert invoice.provider_invoice_id == f"prov_{invoice.id}_500"
    assert main(["invoice", "--period", "2025-01", *inline]) == 0  # again: not sent twice
    assert calls.read_text().splitlines() == [invoice.id]


# --- a CLI people like --------------------------------------------------------------------


def test_keys_list_is_a_table_with_headers_or_json_lines(sqlite_engine, monkeypatch, capsys):
    import json

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    assert main(["keys", "create", "--tenant", "acme", "--scope", "billing.read"]) == 0
    assert main(["keys", "create", "--operator", "--scope", "billing.admin", "--name", "ops"]) == 0
    capsys.readouterr()
    assert main(["keys", "list"]) == 0
    header, _rule, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["id", "prefix", "tenant", "scopes", "state", "name", "created"]
    assert sorted(row.split()[2:5] for row in rows) == [
        ["(operator)", "billing.admin", "active"],
        ["acme", "billing.read", "active"],
    ]
    assert main(["keys", "list", "--json"]) == 0
    keys = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((k["tenant"], k["scopes"], k["name"]) for k in keys) == [
        ("(operator)", ["billing.admin"], "ops"),
        ("acme", ["billing.read"], None),
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_is_drawn_on_a_terminal_only() -> None:
    from webhooks.output import progress

    terminal, piped = Terminal(), io.StringIO()
    for stream in (terminal, piped):
        with progress(4, "invoice 2025-01", stream=stream) as bar:
            for failed in (0, 0, 1, 1):
                bar.advance(failed)
    assert "invoice 2025-01" in terminal.getvalue()
    assert "4/4" in terminal.getvalue()
    assert "1 failed" in terminal.getvalue()
    assert piped.getvalue() == ""


def test_the_backfill_help_says_the_last_day_is_included(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["aggregate", "--help"])
    assert "last day, included" in " ".join(capsys.readouterr().out.split())
