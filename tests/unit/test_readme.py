"""The README's Python code runs as written, twice, from an empty folder, and prints what it says.

A ```python block followed by a ```text block must print exactly that text, on both runs.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

BLOCK = re.compile(r"```python\n(?P<code>.*?)```\n(?:\n```text\n(?P<output>.*?)```\n)?", re.DOTALL)


@dataclass(frozen=True)
class Example:
    code: str
    output: str | None


def python_blocks() -> list[Example]:
    return [Example(match["code"], match["output"]) for match in BLOCK.finditer(README.read_text())]


def test_the_readme_has_python_examples_that_show_their_output() -> None:
    examples = python_blocks()
    assert len(examples) >= 5
    assert sum(example.output is not None for example in examples) >= 5


def run(example: Example, index: int) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = compile(example.code, f"README.md block {index}", "exec")
        exec(code, {"__name__": "readme"})
    return printed.getvalue()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_twice_in_an_empty_folder(
    index: int, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    example = python_blocks()[index]
    first, second = run(example, index), run(example, index)
    if example.output is not None:
        assert (first, second) == (example.output, example.output)
