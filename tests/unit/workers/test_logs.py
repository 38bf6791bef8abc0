"""Logs: one line per job with tenant, ids, outcome and duration; JSON when LOG_FORMAT says so."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from billing.models import Invoice
from workers import actors
from workers.broker import QUEUE_NAME
from workers.errors import InvalidPayloadError
from workers.jobs import aggregate_daily_job, generate_monthly_invoice_job
from workers.logs import JsonFormatter, configure_logging
from workers.settings import LogSettings, WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)
JANUARY_INVOICE = {
    "tenant_id": "t1",
    "period_start": JAN.isoformat(),
    "period_end": datetime(2025, 2, 1, tzinfo=UTC).isoformat(),
    "currency": "usd",
}
ROOT = Path(__file__).resolve().parents[3]


@contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without pytest's handlers, as a fresh process has it; then restored.

    A context inside the test, not a fixture: pytest adds its handlers for each test phase.
    """
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    try:
        yield root
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = saved
        root.setLevel(level)


def job_lines(caplog, job: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "job", None) == job]


def test_a_job_logs_one_line_with_tenant_ids_outcome_and_duration(
    session_factory, seeded, caplog
) -> None:
    seeded([("t1", 5, JAN)])
    caplog.set_level(logging.INFO, logger="workers.jobs")
    aggregate_daily_job(
        session_factory, {"tenant_id": "t1", "metric": "tokens", "day_start": JAN.isoformat()}
    )
    [line] = job_lines(caplog, "billing.aggregate_daily")
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith("job billing.aggregate_daily ok in ")
    assert "tenant_id=t1 metric=tokens day_start=2025-01-01T00:00:00+00:00 total=5" in (
        line.getMessage()
    )
    assert (line.outcome, line.tenant_id, line.total) == ("ok", "t1", 5)
    assert isinstance(line.duration_ms, float)


def test_an_invoice_job_logs_its_invoice_s_creation_and_status_on_its_one_line(
    session_factory, seeded, caplog
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    caplog.set_level(logging.INFO)
    payload = JANUARY_INVOICE
    invoice_id = generate_monthly_invoice_job(session_factory, payload)
    again = generate_monthly_invoice_job(session_factory, payload)  # found: nothing to note
    first, second = job_lines(caplog, "billing.generate_monthly_invoice")
    assert (first.invoice_created, first.status, first.invoice_id) == (True, "open", invoice_id)
    assert f"invoice_created=True status=open invoice_id={invoice_id}" in first.getMessage()
    assert (again, hasattr(second, "invoice_created"), hasattr(second, "status")) == (
        invoice_id,
        False,
        False,
    )
    assert [r.getMessage() for r in caplog.records if r.name == "billing.service"] == []


class _OutboxDown:
    """An outbox that fails: the job fails after the service created its invoice."""

    def publish(self, session: object, topic: str, payload: object, **options: object) -> None:
        raise RuntimeError("outbox down")


def test_a_job_failing_after_creating_its_invoice_does_not_log_it_as_created(
    session_factory, seeded, caplog
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    caplog.set_level(logging.INFO)
    payload = JANUARY_INVOICE
    with pytest.raises(RuntimeError, match="outbox down"):
        generate_monthly_invoice_job(session_factory, payload, webhooks=_OutboxDown())
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Invoice)) == 0
    [line] = job_lines(caplog, "billing.generate_monthly_invoice")
    assert line.outcome == "failed"
    assert "error=RuntimeError: outbox down" in line.getMessage()
    assert not hasattr(line, "invoice_created")
    assert not hasattr(line, "status")


def test_a_failing_job_logs_failed_and_a_rejected_payload_logs_rejected(
    session_factory, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="workers.jobs")

    class Down:
        def begin(self):
            raise OperationalError("BEGIN", {}, Exception("database restarting"))

    payload = {"tenant_id": "t1", "metric": "tokens", "day_start": JAN.isoformat()}
    with pytest.raises(OperationalError):
        aggregate_daily_job(Down(), payload)  # type: ignore[arg-type]
    with pytest.raises(InvalidPayloadError):
        aggregate_daily_job(session_factory, {"tenant_id": "t1"})
    failed, rejected = job_lines(caplog, "billing.aggregate_daily")
    assert (failed.levelno, failed.outcome, failed.tenant_id) == (logging.WARNING, "failed", "t1")
    assert failed.error.startswith("OperationalError")
    assert (rejected.levelno, rejected.outcome) == (logging.ERROR, "rejected")
    assert "day_start" in rejected.error


def test_inside_a_worker_the_line_carries_the_message_id_and_retries(
    stub_broker, stub_worker, bound, seeded, caplog
) -> None:
    seeded([("t1", 5, JAN)])
    caplog.set_level(logging.INFO, logger="workers.jobs")
    message = actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
    stub_broker.join(QUEUE_NAME, timeout=10_000)
    stub_worker.join()
    [line] = job_lines(caplog, "billing.aggregate_daily")
    assert (line.message_id, line.retries) == (message.message_id, 0)


def test_the_json_formatter_writes_one_object_per_record_with_the_extra_fields() -> None:
    record = logging.LogRecord("workers.jobs", logging.INFO, __file__, 1, "job %s ok", ("x",), None)
    record.tenant_id, record.duration_ms = "t1", 1.5
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job x ok"
    assert (entry["level"], entry["logger"], entry["tenant_id"], entry["duration_ms"]) == (
        "INFO",
        "workers.jobs",
        "t1",
        1.5,
    )
    assert entry["time"].endswith("+00:00")
    assert "args" not in entry
    assert "msg" not in entry
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc_info"]


def test_configure_logging_writes_json_or_text_and_replaces_itself() -> None:
    with bare_root() as root:
        stream = io.StringIO()
        configure_logging(LogSettings(log_format="json"), stream=stream)
        configure_logging(LogSettings(log_format="json", log_level="WARNING"), stream=stream)
        assert len(root.handlers) == 1
        logging.getLogger("workers.test").info("dropped below WARNING")
        logging.getLogger("workers.test").warning("kept %d", 1, extra={"tenant_id": "t1"})
        [line] = stream.getvalue().splitlines()
        assert json.loads(line)["tenant_id"] == "t1"
        text = io.StringIO()
        configure_logging(LogSettings(), stream=text)
        logging.getLogger("workers.test").info("plain")
        assert text.getvalue().rstrip().endswith("INFO workers.test plain")


def test_a_worker_process_keeps_its_handler_and_gets_the_json_formatter() -> None:
    with bare_root() as root:
        pipe = io.StringIO()
        # What `dramatiq` does in each worker process:
        logging.basicConfig(level=logging.DEBUG, stream=pipe)
        foreign = logging.NullHandler()
        root.addHandler(foreign)
        configure_logging(LogSettings(log_format="json"))
        assert len(root.handlers) == 2
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert foreign.formatter is None
        logging.getLogger("dramatiq.worker").info("Worker process is ready for action.")
        assert json.loads(pipe.getvalue())["message"] == "Worker process is ready for action."


FORGED = "t1\n2025-01-01 INFO workers.jobs job ok\x1b[2J\u202e"


def test_text_logs_escape_untrusted_text_in_the_message_and_the_traceback() -> None:
    with bare_root():
        text = io.StringIO()
        configure_logging(LogSettings(), stream=text)
        logging.getLogger("workers.test").warning("job for %s", FORGED)
        try:
            raise ValueError(FORGED)
        except ValueError:
            logging.getLogger("workers.test").exception("failed")
    lines = text.getvalue().splitlines()
    assert lines[0].endswith("job for t1\\n2025-01-01 INFO workers.jobs job ok\\x1b[2J\\u202e")
    assert lines[1].endswith(" ERROR workers.test failed")
    assert "  ValueError: t1" in lines
    assert all(line.startswith("  ") for line in lines[2:])  # a forged line stays inside
    assert not {"\x1b", "\u202e"} & set(text.getvalue())


def test_json_logs_carry_untrusted_text_escaped_and_decode_to_it() -> None:
    with bare_root():
        stream = io.StringIO()
        configure_logging(LogSettings(log_format="json"), stream=stream)
        logging.getLogger("workers.test").info("job for %s", FORGED, extra={"metric": FORGED})
    [line] = stream.getvalue().splitlines()
    assert not {"\x1b", "\u202e"} & set(line)
    entry = json.loads(line)
    assert (entry["message"], entry["metric"]) == (f"job for {FORGED}", FORGED)


def test_a_worker_process_handler_keeps_its_text_layout_but_escaped() -> None:
    with bare_root():
        pipe = io.StringIO()
        logging.basicConfig(level=logging.DEBUG, stream=pipe, format="[%(name)s] %(message)s")
        configure_logging(LogSettings())
        logging.getLogger("dramatiq.worker").info("%s", FORGED)
    assert pipe.getvalue() == (
        "[dramatiq.worker] t1\\n2025-01-01 INFO workers.jobs job ok\\x1b[2J\\u202e\n"
    )


def test_the_worker_boot_configures_logging(sqlite_engine, monkeypatch) -> None:
    with bare_root():
        pipe = io.StringIO()
        logging.basicConfig(stream=pipe)
        monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
        monkeypatch.setattr(actors, "settings", WorkerSettings(log_format="json"))
        actors.unbind()
        try:
            actors.BindDatabaseOnBoot().after_process_boot(actors.broker)
        finally:
            actors.unbind()
        first = json.loads(pipe.getvalue().splitlines()[0])
        assert first["message"].startswith("billing actors use sqlite:///")


def test_the_billing_command_logs_json_when_asked(tmp_path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/b.db", "LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(entry["logger"].startswith("alembic") for entry in lines)
    assert all(entry["level"] == "INFO" for entry in lines)


def test_the_scheduler_logs_json_when_asked(sqlite_engine) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "LOG_FORMAT": "json",
    }
    for name in ("REDIS_URL", "BROKER_URL"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.scheduler"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + 30
        assert process.stderr is not None
        while time.monotonic() < deadline:  # until the catch-up has run
            line = process.stderr.readline()
            if not line:
                break
            seen.append(json.loads(line))
            if seen[-1]["message"].startswith("billing.monthly-invoices: "):
                break
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    seen += [json.loads(line) for line in rest.splitlines()]  # JSON to the end
    [started] = [e for e in seen if e["message"].startswith("scheduler started")]
    assert started["logger"] == "workers.scheduler"
    [fire] = [e for e in seen if e["message"].startswith("billing.monthly-invoices: ")]
    assert (fire["fire"], fire["enqueued"]) == ("billing.monthly-invoices", 0)
