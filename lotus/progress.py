"""How long-running library functions report progress without drawing anything.

The library calls a `Progress` callback; the CLI turns the calls into a rich progress bar and a
notebook or a service may do something else. `None` reports nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# progress(label, done, total, status): `label` names the task ("epoch 3/20", "scoring patches"),
# `done` of `total` units are finished (total None when unknown), `status` is a short free text
# ("loss 0.412 acc 87.1%"). A task ends when done == total; a new label starts a new task.
Progress = Callable[[str, int, "int | None", str], None]


def report(progress: Progress | None, label: str, done: int, total: int | None, status: str = "") -> None:
    """Call `progress` when there is one."""
    if progress is not None:
        progress(label, done, total, status)


def log_to_stderr(line: str) -> None:
    """The library's default `log`: one message per line on stderr (stdout carries results)."""
    print(line, file=sys.stderr, flush=True)
