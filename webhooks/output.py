"""What the `billing` command line prints: listings as tables or JSON lines, progress bars.

A listing is a table with a header row and aligned columns (rich), bold headers on a terminal
and plain text when piped (at any width: a piped line is never wrapped); `--json` prints one JSON
object per row instead, for machines. Every cell goes through `safe_text` and is rendered as
plain text, never as rich markup, so a tenant's or subscriber's text can neither forge a line
nor restyle the terminal. `progress` draws a bar on a terminal only.

It lives in `webhooks`, the package the others depend on, like `webhooks.safetext`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from webhooks.safetext import safe_text

PIPED_WIDTH = 100_000
"""The console width when not on a terminal: rows stay on one line for grep and awk."""


def console(out: TextIO | None = None) -> Console:
    """A rich console on `out` (stdout): colours on a terminal only, no wrapping when piped."""
    out = out or sys.stdout
    terminal = out.isatty()
    return Console(file=out, width=None if terminal else PIPED_WIDTH, force_terminal=terminal)


def print_rows(
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    *,
    as_json: bool,
    out: TextIO | None = None,
) -> int:
    """Print `rows` (mappings with the `columns` as keys) as a table, or one JSON object per
    row with `as_json`; return how many rows were printed."""
    out = out or sys.stdout
    if as_json:
        count = 0
        for row in rows:
            out.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
            count += 1
        return count
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(cell(row.get(column)) for column in columns))
    console(out).print(table)
    return table.row_count


def cell(value: object) -> Text:
    """A value as a table cell: `-` for None, ISO 8601 for times, escaped plain text."""
    if value is None:
        return Text("-")
    if isinstance(value, datetime):
        return Text(value.isoformat(timespec="seconds"))
    if isinstance(value, list | tuple | set | frozenset):
        return Text(",".join(safe_text(item) for item in value))
    return Text(safe_text(value))


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


class Counted:
    """A running count behind a progress bar: `advance()` once per item, failed or not."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, failed: int = 0) -> None:
        """One more item done; `failed` says how many have failed so far."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, failed=failed)


@contextmanager
def progress(total: int, label: str, *, stream: TextIO | None = None) -> Iterator[Counted]:
    """A progress bar of `total` items on `stream` (stderr) when it is a terminal; nothing
    otherwise (logs and pipes get the command's summary line only)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield Counted(None, None)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        console=Console(file=stream),
        transient=False,
    )
    with bar:
        yield Counted(bar, bar.add_task(safe_text(label), total=total, failed=0))
