"""The rich progress bars the CLI draws for the library's `lotus.progress.Progress` callbacks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.common import err
from lotus.progress import Progress as ProgressCallback


@contextmanager
def progress_bars(show: bool = True) -> Iterator[ProgressCallback]:
    """A `Progress` callback drawing one bar per task on stderr, cleared when the block ends.

    Each new label adds a bar, which goes once its task ends (done == total). Nothing is drawn
    when `show` is False or stderr is not a terminal (a log file, a pipe, a test).
    """
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not (show and err.is_terminal),
        redirect_stdout=sys.stdout.isatty(),  # results piped or written to a file stay on stdout
    )
    tasks: dict[str, TaskID] = {}

    def report(label: str, done: int, total: int | None, status: str = "") -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total, status=status)
            bars.refresh()  # draw every task at once, however short it turns out
        bars.update(tasks[label], completed=done, total=total, status=status)
        if total is not None and done >= total:
            bars.remove_task(tasks.pop(label))

    with bars:
        yield report
