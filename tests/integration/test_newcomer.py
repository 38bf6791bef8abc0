"""A newcomer's first hour, scripted: the README's commands run by bash, as written, twice, from
an empty folder, and the failures a newcomer meets, each answered in one line with exit 2.

The rest of that hour has its own tests: the README's Python blocks run twice and print what they
say (`tests/unit/test_readme.py`), its HTTP admin blocks run against `billing run`
(`test_examples.py`), the Procfile recipe with a receiver counts on `/metrics`
(`workers/test_procfile_metrics.py`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def block(language: str, containing: str) -> str:
    """The README's one `language` block that contains `containing`."""
    (found,) = [
        code
        for code in re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)
        if containing in code
    ]
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
