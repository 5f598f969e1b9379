"""The `lotus` command line: one command per pipeline stage, each a thin skin over `lotus`.

Each command group lives in its own module (cli/train.py, cli/prune.py, ...); the options they
share, the one-line errors and the progress bars are in cli/common.py and cli/progress.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

import lotus
from cli import bench, compress, export, prune, serve, tickets, train

app = typer.Typer(
    name="lotus",
    help="LOTUS: train, compress, export and serve Vision Transformers (data lottery tickets + ISSP pruning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_callback(value: bool) -> None:
    if value:
        print(f"lotus {lotus.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool | None, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    pass


# In the order `lotus --help` lists them: the stages as a user runs them, then the groups.
app.command()(train.train)
app.command("eval")(train.eval_)
app.command()(tickets.tickets)
app.command()(compress.compress)
app.command()(bench.bench)
app.command()(serve.serve)
app.add_typer(export.app, name="export")
app.add_typer(prune.app, name="prune")


def run() -> None:
    """The `lotus` console script: `app`, with `--pretrained FILE` read as `--pretrained-path FILE`."""
    app(args=pretrained_file_args(sys.argv[1:]), prog_name="lotus")


def pretrained_file_args(args: list[str]) -> list[str]:
    """`--pretrained FILE` (and `--pretrained=FILE`) as `--pretrained-path FILE`; a bare
    `--pretrained` stays the hub's weights. Typer has no option whose value may be left out, and
    no command that takes --pretrained has an argument that could follow it."""
    out = []
    for i, arg in enumerate(args):
        if arg.startswith("--pretrained="):
            out += ["--pretrained-path", arg.split("=", 1)[1]]
        elif arg == "--pretrained" and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out.append("--pretrained-path")
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    run()
