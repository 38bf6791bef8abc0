"""What `scripts/mutate` relies on in `tests/conftest.py` (pytest runs in a child process here)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTATION_FILTER = "not postgres and not redis and not slow"


def collected(env: dict[str, str]) -> list[str]:
    argv = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", MUTATION_FILTER]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *argv, "tests/unit/billing/test_numbering.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_under_scripts_mutate_postgres_the_postgres_variants_are_collected_too() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MUTATE_WITH_POSTGRES"}
    on_sqlite = collected(env)
    both = collected({**env, "MUTATE_WITH_POSTGRES": "1"})
    assert on_sqlite
    assert all("[postgresql]" not in test for test in on_sqlite)
    assert sorted(both) == sorted(
        on_sqlite + [test.replace("[sqlite]", "[postgresql]") for test in on_sqlite]
    )


def test_each_session_in_one_process_has_its_own_mark(tmp_path: Path) -> None:
    """mutmut forks every mutant's session from one process that imported the conftest once."""
    script = tmp_path / "two_sessions.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import pytest

            marks = []

            class Mark:
                def pytest_collection_finish(self, session):
                    conftest = session.config.pluginmanager.get_plugin(CONFTEST)
                    marks.append(conftest.RUN)

            for _ in range(2):
                pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/unit/test_db.py"], plugins=[Mark()])
            print(*marks)
            """
        ).replace("CONFTEST", repr(str(ROOT / "tests" / "conftest.py")))
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    first, second = done.stdout.split()[-2:]
    assert len(first) == len(second) == 10
    assert first != second
