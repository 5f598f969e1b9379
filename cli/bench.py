"""`lotus bench`: latency of a running server (`URL`) or of ONNX Runtime alone (`--local`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

import lotus
from cli.common import err, log, parse_floats, user_errors
from cli.progress import progress_bars

if TYPE_CHECKING:
    from lotus.bench import LocalBenchConfig
    from serve.bench import HttpBenchConfig

UrlArg = Annotated[
    str | None,
    typer.Argument(help="A running `lotus serve` (or any OIP v2 server), e.g. http://127.0.0.1:8000: load it over HTTP."),
]
LocalOpt = Annotated[
    Path | None,
    typer.Option(
        "--local", help="Time this ONNX model in ONNX Runtime, without HTTP (with URL: the HTTP overhead is the difference)."
    ),
]
BatchSizesOpt = Annotated[str, typer.Option(help="Comma-separated batch sizes (--local alone).")]
DropsOpt = Annotated[str, typer.Option("--drop", help="Comma-separated drop ratios.")]
RunsOpt = Annotated[int, typer.Option(help="Timed runs per cell (--local alone; 50 at least for p99).")]
WarmupOpt = Annotated[int | None, typer.Option(help="Untimed runs per cell (default: 5 local runs, 20 HTTP requests).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: its own choice).")]
ConcurrencyOpt = Annotated[str, typer.Option(help="With URL: comma-separated numbers of clients sending at once.")]
RequestsOpt = Annotated[int, typer.Option(help="With URL: timed requests per cell.")]
DurationOpt = Annotated[float | None, typer.Option(help="With URL: seconds per cell instead of --requests.")]
BatchOpt = Annotated[int, typer.Option(help="With URL: images per request.")]
RoundsOpt = Annotated[
    int,
    typer.Option(min=1, help="With URL: visit every cell this many times, round-robin, so machine drift hits all cells alike."),
]
NameOpt = Annotated[str, typer.Option(help="With URL: the model's name on the server.")]
BinaryOpt = Annotated[
    bool, typer.Option("--binary", help="With URL: send tensors in binary (Triton's extension) instead of JSON.")
]
ApiKeyOpt = Annotated[
    str | None, typer.Option(envvar="LOTUS_API_KEY", help="With URL: the server's API key (env LOTUS_API_KEY).")
]
PlotOpt = Annotated[Path | None, typer.Option(help="With URL: PNG of latency against drop (default: beside --out).")]
OutOpt = Annotated[
    Path | None, typer.Option(help="Write the results here as JSON (default: beside the model; with URL: lotus-bench.json).")
]


@user_errors
def bench(
    url: UrlArg = None,
    local: LocalOpt = None,
    batch_sizes: BatchSizesOpt = "1,64",
    drops: DropsOpt = "0,0.1,0.3,0.5",
    runs: RunsOpt = 50,
    warmup: WarmupOpt = None,
    threads: ThreadsOpt = None,
    concurrency: ConcurrencyOpt = "1,4,16",
    requests: RequestsOpt = 200,
    duration: DurationOpt = None,
    batch: BatchOpt = 1,
    rounds: RoundsOpt = 1,
    name: NameOpt = "lotus",
    binary: BinaryOpt = False,
    api_key: ApiKeyOpt = None,
    plot: PlotOpt = None,
    out: OutOpt = None,
) -> None:
    """Latency benchmark: `URL` loads a server perf_analyzer-style; `--local model.onnx` times ONNX Runtime alone."""
    if url is not None:
        from serve.bench import HttpBenchConfig

        cfg = HttpBenchConfig(
            concurrency=tuple(int(c) for c in parse_floats(concurrency, "--concurrency")),
            drops=parse_floats(drops, "--drop"),
            requests=requests,
            duration=duration,
            warmup=20 if warmup is None else warmup,
            batch=batch,
            model=name,
            binary=binary,
            api_key=api_key,
            rounds=rounds,
        )
        load_server(url, cfg, local, threads, out or Path("lotus-bench.json"), plot)
    elif local is not None:
        from lotus.bench import LocalBenchConfig

        cfg = LocalBenchConfig(
            batch_sizes=tuple(int(b) for b in parse_floats(batch_sizes, "--batch-sizes")),
            drops=parse_floats(drops, "--drop"),
            runs=runs,
            warmup=5 if warmup is None else warmup,
            threads=threads,
        )
        time_local(local, cfg, out or local.with_suffix(".bench.json"))
    else:
        raise lotus.LotusError("pass a URL to load a server (`lotus bench http://127.0.0.1:8000`), or --local model.onnx")


def load_server(url: str, cfg: HttpBenchConfig, local: Path | None, threads: int | None, out: Path, plot: Path | None) -> None:
    """Load `url` cell by cell; print the table, write the JSON and the latency plot."""
    from lotus.checkpoint import atomic_write_text
    from serve.bench import bench_http, format_table, save_plot

    with progress_bars() as progress:
        result = bench_http(url, cfg, local=local, threads=threads, progress=progress)
    print(format_table(result))
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    plot = save_plot(result, plot or out.with_suffix(".png"))
    failed = sum(c["errors"] for c in result["cells"])
    err.print(f"results: {out}, plot: {plot}" + (f"; [bold red]{failed} requests failed[/]" if failed else ""))


def time_local(model: Path, cfg: LocalBenchConfig, out: Path) -> None:
    """Time `model` in ONNX Runtime at every (batch, drop); print the table, write the JSON."""
    from lotus.bench import bench_local, format_local_table
    from lotus.checkpoint import atomic_write_text

    result = bench_local(model, cfg, log=log)
    print(format_local_table(result))
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    err.print(f"results: {out}")
