"""Fail when a function in the library, the CLI or the service is longer than MAX_LINES.

A long function usually does several jobs; split it so the main path reads top to bottom.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 60
PACKAGES = ("lotus", "cli", "serve")


def long_functions(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    """'path:line name (N lines)' for every function over `max_lines`, from `def` to its last line."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > max_lines:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


if __name__ == "__main__":
    too_long = long_functions(Path(__file__).resolve().parent.parent)
    for line in too_long:
        print(line)
    if too_long:
        print(f"{len(too_long)} functions over {MAX_LINES} lines: split them", file=sys.stderr)
    sys.exit(1 if too_long else 0)
