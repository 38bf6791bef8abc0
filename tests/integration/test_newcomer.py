"""A newcomer's first hour, scripted, in one module: every README block run as written, twice,
from an empty folder (the Python blocks print what they say, the shell blocks and the HTTP admin
calls against `billing run` change nothing the second time), the Procfile recipe on PostgreSQL
and Redis delivering to a receiver and counting on `/metrics`, and the failures a newcomer meets,
each answered in one line with exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from billing.models import Invoice
from tests.integration.workers.test_processes import (
    count,
    covered_day,
    invoiced_month,
    seed_subscriptions,
    seed_usage,
)
from tests.processes import accepting_receiver, free_port, procfile_command, serving, wait_until
from webhooks.subscriptions import SqlWebhookSubscriptions
from workers.jobs import INVOICE_CREATED, USAGE_AGGREGATED

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def blocks(language: str) -> list[str]:
    """The README's `language` blocks, in order."""
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def block(language: str, containing: str) -> str:
    """The README's one `language` block that contains `containing`."""
    (found,) = [code for code in blocks(language) if containing in code]
    return found


def bash(script: str, folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`script` run by bash -e in `folder`, with the package's `billing` on PATH and none of the
    developer's DATABASE_URL, REDIS_URL or BROKER_URL."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    base.pop("BROKER_URL", None)
    base["PATH"] = f"{BIN}{os.pathsep}{base['PATH']}"
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=folder,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- the README's Python blocks -----------------------------------------------------------------

PYTHON_BLOCK = re.compile(
    r"```python\n(?P<code>.*?)```\n(?:\n```text\n(?P<output>.*?)```\n)?", re.DOTALL
)
"""A ```python block, and the ```text block after it: what it must print, on both runs."""
PYTHON_BLOCKS = [(match["code"], match["output"]) for match in PYTHON_BLOCK.finditer(README)]


def test_the_readme_has_python_examples_that_show_their_output() -> None:
    assert len(PYTHON_BLOCKS) >= 5
    assert sum(output is not None for _, output in PYTHON_BLOCKS) >= 5


def run_python(code: str, index: int) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})
    return printed.getvalue()


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_twice_in_an_empty_folder(index, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = PYTHON_BLOCKS[index]
    first, second = run_python(code, index), run_python(code, index)
    if output is not None:
        assert (first, second) == (output, output)


# --- the README's shell blocks ------------------------------------------------------------------


@pytest.mark.timeout(300)  # about 16 `billing` processes: 10 s each on a loaded machine
def test_the_plans_as_code_blocks_run_twice_from_an_empty_folder(tmp_path) -> None:
    (tmp_path / "catalog.yaml").write_text(block("yaml", "plans:"))
    commands = block("bash", "billing catalog apply")
    first, second = bash(commands, tmp_path), bash(commands, tmp_path)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert first.stdout.startswith("applied 0001_billing_core")
    assert "catalog.yaml: 4 changes (dry run: none made)" in first.stdout
    assert "catalog.yaml: 4 changes applied" in first.stdout
    assert "was already up to date" in second.stdout
    assert "catalog.yaml: 0 changes (dry run: none made)" in second.stdout
    assert second.stdout.rstrip().endswith("catalog.yaml: no changes")
    assert "key: pro-tokens" in (tmp_path / "exported.yaml").read_text()


def test_billing_demo_runs_twice_and_writes_nothing_where_it_runs(tmp_path) -> None:
    for _ in range(2):
        done = bash("billing demo", tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("\ninvoice ") == 3
        assert "`billing run` starts on DATABASE_URL (sqlite:///billing.sqlite3)" in done.stdout
    assert list(tmp_path.iterdir()) == []


def json_documents(text: str) -> list[dict]:
    """The JSON objects in `text` (curl prints bodies without a newline), in order."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        document, end = decoder.raw_decode(text, at)
        found.append(document)
        at = text.find("{", end)
    return found


def test_the_readmes_admin_curl_examples_run_twice_against_billing_run(tmp_path) -> None:
    """The README's HTTP admin blocks, run by bash as written (only the port differs) against
    `billing run`: the key once, the calls twice; the second run changes nothing."""
    port = free_port()
    key = block("bash", "billing keys create --operator")
    calls = block("bash", "$BILLING/plans")
    script = f"{key}\n{calls}\necho ---\n{calls}".replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'billing.sqlite3'}",
        "USAGE_MAX_AGE": "P3650D",  # as the README starts it: its usage is from January 2025
    }
    argv = [f"{BIN}/billing", "run", "--web-port", str(port), "--no-relay"]
    with serving(argv, env, tmp_path / "run.log", port, cwd=tmp_path):
        done = bash(script, tmp_path, **env)
    assert done.returncode == 0, done.stderr
    first, second = (json_documents(run) for run in done.stdout.split("---\n"))
    plan, fee, tokens, calls_price, subscription, usage, totals, invoices, operators = first
    assert (plan["key"], plan["entitlements"][0]["limit_per_window"]) == ("pro", 100)
    prices = [fee, tokens, calls_price]
    assert [price["key"] for price in prices] == ["pro-fee", "pro-tokens", "pro-calls"]
    assert (subscription["tenant_id"], subscription["plan_key"]) == ("acme", "pro")
    assert usage["duplicate"] is False
    assert [item["total"] for item in totals["items"]] == [12_345_678]
    ((invoice,),) = [invoices["items"]]
    assert (invoice["total_amount"], invoice["currency"]) == (2100 + 2469, "usd")
    assert operators["items"] == [invoice]
    assert second[0]["prices"] == sorted(prices, key=lambda price: price["key"])
    assert second[1:5] == [*prices, subscription]  # updated in place; the subscription replayed
    assert (second[5]["duplicate"], second[6:]) == (True, [totals, invoices, operators])


# --- the Procfile recipe ------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, flags=re.MULTILINE)
    return float(found[1]) if found else 0.0


@pytest.mark.postgres
@pytest.mark.redis
def test_the_procfiles_metrics_count_the_workers_and_the_relays_work(
    spawn, base_env, pg_factory, tmp_path
) -> None:
    """The README's Procfile recipe, as written, on PostgreSQL and Redis, with a receiver:
    `/metrics` on the web process counts what the worker and the relay did (they share
    `PROMETHEUS_MULTIPROC_DIR`)."""
    day = covered_day()
    start, _end = invoiced_month()
    seed_usage(pg_factory, 3, day)
    seed_subscriptions(pg_factory, ["t00000", "t00001"], start)
    port = free_port()
    assert not (tmp_path / "metrics").exists()  # base_env's folder: the processes create it
    env = {
        **base_env,
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "WEBHOOKS_ALLOW_LOOPBACK": "true",
        "WEBHOOKS_POLL_INTERVAL": "0.2",
    }
    with accepting_receiver() as receiver:
        with pg_factory.begin() as session:
            subscriptions = SqlWebhookSubscriptions(session)
            for topic in (USAGE_AGGREGATED, INVOICE_CREATED):
                subscriptions.add(topic, receiver, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        names = ("web", "worker", "relay", "scheduler")  # the scheduler: its catch-up
        processes = [spawn(name, procfile_command(name), env) for name in names]
        base = f"http://127.0.0.1:{port}"

        def scraped() -> str:
            try:
                return httpx.get(f"{base}/metrics", timeout=5).text
            except httpx.TransportError:
                return ""

        delivered = 'webhooks_deliveries_total{outcome="delivered"}'
        wait_until(
            lambda: metric(scraped(), delivered) == 5,
            90,
            what="5 deliveries counted on the web process's /metrics",
            interval=0.2,
        )
        text = scraped()
        assert metric(text, "billing_invoice_generated_total") == 2
        assert metric(text, "billing_aggregate_duration_ms_count") == 3
        assert count(pg_factory, Invoice, Invoice.period_start == start) == 2
        for process in processes:
            process.signal(signal.SIGTERM)
        for process in processes:
            assert process.wait(timeout=30) in (0, -signal.SIGTERM), process.output()


def test_every_procfile_line_shares_one_metrics_folder_by_default() -> None:
    for name in ("web", "worker", "scheduler", "relay"):
        assert procfile_command(name).startswith(
            "env PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-/tmp/billing-metrics} "
        )


# --- a newcomer's mistakes ----------------------------------------------------------------------


FAILURES = [
    ("billing keys list", {}, "no database at "),
    ("billing webhooks list", {}, "no database at "),
    (
        "billing invoice --period 2025-01",
        {"DATABASE_URL": "postgresql://billing:s3cret@127.0.0.1:1/billing"},
        "cannot use the database at postgresql://billing:***@127.0.0.1:1/billing",
    ),
    ("billing db upgrade", {"DATABASE_URL": "postgres//nowhere"}, "is not a database URL"),
    ("billing jobs", {"REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis"),
    (
        "touch empty.sqlite3 && billing keys list",
        {"DATABASE_URL": "sqlite:///empty.sqlite3"},
        "has no billing tables: run `billing db upgrade`",
    ),
]


@pytest.mark.parametrize(("command", "env", "said"), FAILURES)
def test_a_newcomers_mistakes_get_one_line_and_exit_2(command, env, said, tmp_path) -> None:
    done = bash(command, tmp_path, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert said in line
    assert "s3cret" not in line
    assert not (tmp_path / "billing.sqlite3").exists()
