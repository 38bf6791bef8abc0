"""What `scripts/mutate` relies on in `tests/conftest.py` (pytest runs in a child process here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

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


def load_mutate_script() -> ModuleType:
    loader = SourceFileLoader("mutate_script", str(ROOT / "scripts" / "mutate"))
    module = ModuleType(loader.name)
    module.__file__ = loader.path
    loader.exec_module(module)
    return module


SETUP = {"mutmut": "3.8.1", "configuration": {"timeout": "a"}}
TWO_FUNCTIONS = "def a(x):\n    return x + 1\n\n\ndef b(x):\n    return x * 2\n"


def write_module(root: Path, body: str) -> Path:
    source = root / "pkg" / "m.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(body)
    return source


def test_committed_verdicts_stand_for_unchanged_functions_and_not_for_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scripts/mutate` saves mutmut's verdicts to `mutation-results/` and restores them into a
    checkout without `mutants/`; mutmut (the pinned version) then keeps the verdicts of the
    functions whose code is unchanged and runs the changed ones' again."""
    mutmut_main = pytest.importorskip("mutmut.__main__")
    from mutmut.mutation.data import SourceFileMutationData

    mutate = load_mutate_script()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nsource_paths = ["pkg"]\n')
    source = write_module(tmp_path, TWO_FUNCTIONS)
    relative, mutated = Path("pkg/m.py"), Path("mutants/pkg/m.py")
    mutated.parent.mkdir(parents=True)
    mutmut_main.create_mutants_for_file(relative, mutated)
    run = SourceFileMutationData(path=relative)
    run.load()
    run.exit_code_by_key = dict.fromkeys(run.exit_code_by_key, 1)  # every mutant killed
    run.save()
    mutate.save_results(tmp_path)
    shutil.rmtree(tmp_path / "mutants")  # a new checkout

    source.write_text(source.read_text().replace("x * 2", "x * 3"))
    mutate.restore_results(tmp_path)
    mutated.parent.mkdir(parents=True, exist_ok=True)
    mutmut_main.create_mutants_for_file(relative, mutated)
    again = SourceFileMutationData(path=relative)
    again.load()

    verdicts = {name.split("__mutmut_")[0]: code for name, code in again.exit_code_by_key.items()}
    assert verdicts == {"pkg.m.x_a": 1, "pkg.m.x_b": None}
    assert (tmp_path / "mutation-results" / "pkg" / "m.py.meta").is_file()


def test_restoring_leaves_an_existing_mutants_folder_alone(tmp_path: Path) -> None:
    mutate = load_mutate_script()
    saved = tmp_path / "mutation-results" / "pkg" / "m.py.meta"
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")
    (tmp_path / "mutants").mkdir()
    mutate.restore_results(tmp_path)
    assert not (tmp_path / "mutants" / "pkg").exists()


def test_saved_verdicts_come_back_in_a_checkout_without_mutants(tmp_path: Path) -> None:
    mutate = load_mutate_script()
    mutate.mutmut_setup = lambda root: SETUP
    meta = tmp_path / "mutants" / "billing" / "ledger.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"exit_code_by_key": {"billing.ledger.x_store__mutmut_1": 1}}')
    (tmp_path / "mutants" / "mutmut-stats.json").write_text("{}")
    mutate.save_results(tmp_path)
    shutil.rmtree(tmp_path / "mutants")
    mutate.restore_results(tmp_path)
    restored = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mutants").rglob("*"))
    assert restored == [Path("mutants/billing"), Path("mutants/billing/ledger.py.meta")]
    assert meta.read_text() == '{"exit_code_by_key": {"billing.ledger.x_store__mutmut_1": 1}}'


def test_verdicts_of_another_mutmut_version_or_configuration_are_not_restored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate = load_mutate_script()
    meta = tmp_path / "mutants" / "billing" / "ledger.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text("{}")
    mutate.mutmut_setup = lambda root: SETUP
    mutate.save_results(tmp_path)
    shutil.rmtree(tmp_path / "mutants")
    for other in ({**SETUP, "mutmut": "3.9.0"}, {**SETUP, "configuration": {"timeout": "b"}}):
        mutate.mutmut_setup = lambda root, other=other: other
        mutate.restore_results(tmp_path)
        assert not (tmp_path / "mutants").exists()
        assert "made by another mutmut version" in capsys.readouterr().err
