"""The `lotus` command line: one command per pipeline stage, each a thin skin over `lotus`."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

import lotus

app = typer.Typer(
    name="lotus",
    help="LOTUS: train, compress, export and serve Vision Transformers (data lottery tickets + ISSP pruning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """Print a LotusError as one line (exit 2) and Ctrl-C as a hint (exit 130), no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except lotus.LotusError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted:[/] run the same command with --resume to continue from the last finished epoch")
            raise typer.Exit(130) from None

    return wrapper


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


# Options shared by every command that reads a dataset.
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="'digits' (bundled, offline), 'cifar10' (torchvision, in --data-dir), or an ImageFolder root with train/ and test/.",
    ),
]
DataDirOpt = Annotated[Path, typer.Option(help="Folder holding torchvision's CIFAR-10 (only for --data cifar10).")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Let torchvision download CIFAR-10 into --data-dir.")]
DeviceOpt = Annotated[str, typer.Option(help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")]


def _given(**values: Any) -> dict[str, Any]:
    """The options the user set (those left at None fall back to the dataset's defaults)."""
    return {k: v for k, v in values.items() if v is not None}


@app.command()
@user_errors
def train(
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    img_size: Annotated[
        int | None, typer.Option(help="Resize images to this square side (default: digits 16, others native).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="timm VisionTransformer architecture.")] = None,
    patch_size: Annotated[
        int | None, typer.Option(help="Patch side in pixels (default: 4 up to 64px images, 16 beyond).")
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help="Number of transformer blocks (default: the architecture's; digits 4).")
    ] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start from timm's hub weights (needs a network).")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Start from this LOTUS checkpoint (file or run folder).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up length in epochs.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Cross-entropy label smoothing.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for weights, batch order, augmentation and dropout.")] = None,
    device: DeviceOpt = "auto",
    tickets: Annotated[
        Path | None, typer.Option(help="Train on the kept patches of these data lottery tickets (a `lotus tickets` folder).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: a new runs/train-DATE-TIME).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out (default: the latest run) from its last finished epoch.")
    ] = False,
) -> None:
    """Train a ViT (the dense baseline): AdamW, warm-up + cosine, label smoothing, resumable."""
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.train import STATE_FILE, default_configs
    from lotus.train import train as train_run

    data_cfg, model_cfg, train_cfg = default_configs(data)
    data_cfg = replace(data_cfg, data_dir=str(data_dir), download=download, **_given(img_size=img_size))
    model_cfg = replace(model_cfg, pretrained=pretrained, **_given(name=model, patch_size=patch_size, depth=depth))
    train_cfg = replace(
        train_cfg,
        device=device,
        **_given(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing,
            seed=seed,
        ),
    )
    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise lotus.LotusError("under torchrun every process must name the same run folder: pass --out")
    if out is None:
        out = latest_run(containing=f"{STATE_FILE}.json") if resume else new_run_dir("train")
    history = train_run(data_cfg, model_cfg, train_cfg, out, init_checkpoint=checkpoint, tickets=tickets, resume=resume)
    last = history[-1]
    err.print(f"test accuracy {last['test_accuracy']:.2f}% after {last['epoch']} epochs; checkpoint: {out / 'model.safetensors'}")


@app.command("eval")
@user_errors
def eval_(
    checkpoint: Annotated[Path | None, typer.Argument(help="LOTUS checkpoint or run folder (default: the latest run).")] = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: DeviceOpt = "auto",
) -> None:
    """Evaluate a checkpoint on a dataset's test split; prints one JSON line."""
    from lotus.checkpoint import latest_run
    from lotus.data import DataConfig
    from lotus.train import evaluate_checkpoint

    checkpoint = checkpoint or latest_run()
    result = evaluate_checkpoint(checkpoint, DataConfig(data, data_dir=str(data_dir), download=download), batch_size, device)
    print(json.dumps(result))


class Select(str, Enum):
    attention = "attention"
    random = "random"


class Method(str, Enum):
    cls = "cls"
    rollout = "rollout"


@app.command()
@user_errors
def tickets(
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Trained LOTUS checkpoint or run folder that scores the patches (default: the latest run)."),
    ] = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    drop: Annotated[float, typer.Option(help="Fraction of each image's patches to drop, in [0, 1).")] = 0.1,
    select: Annotated[
        Select, typer.Option(help="'attention' (scored by the model) or 'random' (the control, same drop ratio).")
    ] = Select.attention,
    method: Annotated[Method, typer.Option(help="'cls': class-token attention row; 'rollout': attention rollout.")] = Method.cls,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Blocks whose attention is averaged: 'all', or comma-separated, e.g. '-1' or '9,10,11' (default: last for cls, all for rollout)."
        ),
    ] = None,
    cls_sink: Annotated[bool, typer.Option(help="Replace the class token's self-attention by its row mean.")] = True,
    norm_outliers: Annotated[
        bool, typer.Option(help="Replace scores of high-norm outlier patch tokens by their neighbours' mean.")
    ] = True,
    temperature: Annotated[
        float,
        typer.Option(
            help="0: fixed tickets, each image's top-K patches every epoch (the published method). >0: K patches re-drawn in every batch, patch i with weight score**(1/T), 1 = in proportion to its attention; with --select random, uniform re-draws."
        ),
    ] = 0.0,
    spread: Annotated[
        int,
        typer.Option(
            help="1: keep each image's K best patches; S > 1: every S x S block of patches keeps its best first, so the kept patches cover the image."
        ),
    ] = 1,
    balance: Annotated[
        bool,
        typer.Option(
            "--balance",
            help="Rank each patch's score among all images' scores at its position, so every position is kept about equally often (attention tickets).",
        ),
    ] = False,
    fuse: Annotated[
        bool,
        typer.Option(
            "--fuse", help="Train on the kept patches plus one token fusing the dropped ones, weighted by attention (EViT)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of --select random.")] = 0,
    scores_from: Annotated[
        Path | None,
        typer.Option(
            help="Earlier tickets of this checkpoint and data: cut their scores again (another --drop, --spread, --temperature, --balance or --fuse) instead of scoring."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="Tickets folder (default: a new runs/tickets-DATE-TIME).")] = None,
) -> None:
    """Score every training patch with a model's attention and write the keep masks (data lottery tickets)."""
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.data import DataConfig
    from lotus.tickets import TicketConfig, parse_layers, tickets_from_checkpoint
    from lotus.train import make_progress

    cfg = TicketConfig(
        drop=drop,
        select=select.value,
        method=method.value,
        layers=parse_layers(layers),
        cls_sink=cls_sink,
        norm_outliers=norm_outliers,
        temperature=temperature,
        spread=spread,
        balance=balance,
        fuse=fuse,
        seed=seed,
    )
    checkpoint = checkpoint or latest_run()
    out = out or new_run_dir("tickets")
    with make_progress() as progress:
        task = progress.add_task("scoring patches" if scores_from is None else "cutting earlier scores", total=None, status="")
        result = tickets_from_checkpoint(
            checkpoint,
            DataConfig(data, data_dir=str(data_dir), download=download),
            cfg,
            out,
            device=device,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            scores_from=scores_from,
        )
    m = result.meta
    err.print(
        f"kept {result.num_keep} of {m['num_patches']} patches in each of {m['data']['num_images']} images "
        f"({m['outlier_patches']} high-norm outlier patches re-scored); tickets: {out}"
    )


@app.command()
@user_errors
def compress(
    sparsity: Annotated[
        str | None,
        typer.Option(
            help="Stage-1 one-shot sparsity of the prunable weights, 'auto' (the sweep's essential sparsity), or '2:4' (NVIDIA sparse tensor cores). [default: 0.3]"
        ),
    ] = None,
    drop: Annotated[
        float | None,
        typer.Option(help="Fraction of each training image's patches dropped (data lottery tickets). [default: 0.1]"),
    ] = None,
    isp_target: Annotated[
        float | None, typer.Option(help="Stage-2 Instant Soup Pruning target sparsity (off when not given).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs on the lottery data. [default: 5]")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Dense LOTUS checkpoint to compress (default: train the baseline first).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="timm ViT for the baseline when no --checkpoint.")] = None,
    pretrained: Annotated[
        bool | None, typer.Option("--pretrained", help="Start the baseline from timm's hub weights (needs a network).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="'digits' (default), 'cifar10', or an ImageFolder root.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding torchvision's CIFAR-10.")] = None,
    download: Annotated[bool | None, typer.Option("--download", help="Let torchvision download CIFAR-10.")] = None,
    select: Annotated[Select | None, typer.Option(help="Ticket selection: 'attention' or the 'random' control.")] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="Ticket sampling: 0 keeps each image's top-K (default); >0 re-draws K patches per batch, weight score**(1/T) (see `lotus tickets`)."
        ),
    ] = None,
    spread: Annotated[
        int | None,
        typer.Option(
            help="Tickets: S > 1 keeps the best of every S x S block of patches first (see `lotus tickets`). [default: 1]"
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Tickets: blocks whose attention scores the patches, 'all' or e.g. '9,10,11' (see `lotus tickets`). [default: the last]"
        ),
    ] = None,
    balance: Annotated[
        bool | None,
        typer.Option(
            "--balance",
            help="Tickets: rank scores by patch position, so every position is kept about equally often (see `lotus tickets`).",
        ),
    ] = None,
    fuse: Annotated[
        bool | None, typer.Option("--fuse", help="Tickets: one more token fusing the dropped patches (see `lotus tickets`).")
    ] = None,
    structure: Annotated[
        str | None,
        typer.Option(
            help="Structured pruning before fine-tuning, e.g. 'heads=0.34,mlp=0.5' (shares removed; see `lotus prune structured`)."
        ),
    ] = None,
    structure_importance: Annotated[
        str | None, typer.Option(help="With --structure: 'magnitude' (default), 'activation' or 'taylor'.")
    ] = None,
    structure_scope: Annotated[
        str | None, typer.Option(help="With --structure: 'block' (the same share of every block, default) or 'global'.")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="With --sparsity auto: accuracy points below dense still counted as no loss.")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Repeat a run from its recipe.yaml (flags given here override it).")] = None,
    device: Annotated[str | None, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: a new runs/compress-DATE-TIME).")] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --out (default: the latest compress run), skipping finished stages."),
    ] = False,
) -> None:
    """The whole LOTUS pipeline: baseline -> tickets -> prune -> (ISP) -> (structured) -> fine-tune on lottery data -> evaluate -> report."""
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.pipeline import compress as compress_run
    from lotus.pipeline import default_compress_config, load_recipe
    from lotus.tickets import parse_layers

    if resume and recipe is None:  # continue with the settings the run was started with
        out = out or latest_run(containing="recipe.yaml")
        if (out / "recipe.yaml").exists():
            recipe = out / "recipe.yaml"
    cfg = load_recipe(recipe) if recipe else default_compress_config(data or "digits")
    if data is not None and recipe:
        cfg = replace(cfg, data=replace(cfg.data, name=data))
    cfg = replace(
        cfg,
        data=replace(cfg.data, **_given(data_dir=str(data_dir) if data_dir else None, download=download)),
        model=replace(cfg.model, **_given(name=model, pretrained=pretrained)),
        tickets=replace(
            cfg.tickets,
            **_given(
                drop=drop,
                select=select.value if select else None,
                temperature=temperature,
                spread=spread,
                layers=parse_layers(layers),
                balance=balance,
                fuse=fuse,
            ),
        ),
        sweep=replace(cfg.sweep, **_given(tolerance=tolerance)),
        finetune=replace(cfg.finetune, **_given(epochs=epochs)),
        structure=replace(
            cfg.structure, **_parse_structure(structure), **_given(importance=structure_importance, scope=structure_scope)
        ),
        **_given(
            checkpoint=str(checkpoint) if checkpoint else None,
            device=device,
            isp_target=isp_target,
            sparsity=None if sparsity is None else _sparsity(sparsity),
        ),
    )
    out = out or new_run_dir("compress")
    from lotus.device import distributed

    first = distributed()[0] == 0  # under torchrun, one process speaks
    metrics = compress_run(cfg, out, resume=resume, log=lambda line: first and err.print(line, highlight=False))
    if not first:
        return
    print(
        json.dumps({k: metrics[k] for k in ("dense_accuracy", "compressed_accuracy", "sparsity", "drop", "essential_sparsity")})
    )
    err.print(
        f"dense {metrics['dense_accuracy']:.2f}% -> compressed {metrics['compressed_accuracy']:.2f}% at sparsity "
        f"{metrics['sparsity']:.3f}, drop {metrics['drop']:g}; report: {out / 'report.md'}"
    )


def _sparsity(text: str) -> float | str:
    """--sparsity: 'auto', an N:M pattern such as '2:4', or a fraction."""
    from lotus.masks import nm_pattern

    return text if text == "auto" or nm_pattern(text) else _floats(text, "--sparsity")[0]


def _parse_structure(text: str | None) -> dict[str, float]:
    """'heads=0.34,mlp=0.5' -> {'heads': 0.34, 'mlp': 0.5}."""
    if text is None:
        return {}
    parts = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in ("heads", "mlp"):
            raise lotus.LotusError(f"--structure {text!r}: write it as heads=FRACTION,mlp=FRACTION (either may be left out)")
        parts[key.strip()] = _floats(value, f"--structure {key.strip()}")[0]
    return parts


export_app = typer.Typer(help="Export a LOTUS model for deployment.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@user_errors
def export_onnx(
    source: Annotated[Path | None, typer.Argument(help="Run folder or checkpoint (default: the latest run).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="ONNX file (default: SOURCE_RUN/model.onnx; the keep-index graph goes beside it).")
    ] = None,
    quantize: Annotated[str | None, typer.Option(help="'int8': dynamic per-channel signed int8 weights.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    select_block: Annotated[
        int | None,
        typer.Option(help="Block whose class-token attention picks the kept patches (default: depth // 6, block 2 of 12)."),
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Check ONNX Runtime against PyTorch on eval images at drop 0, 0.1, 0.3, 0.5 (fails above 1e-4).")
    ] = True,
    data: Annotated[
        str | None, typer.Option("--data", help="Dataset of the eval images (default: the one the model was trained on).")
    ] = None,
    data_dir: DataDirOpt = Path("data"),
) -> None:
    """Export to ONNX: dynamic batch, patch dropping inside the graph, metadata, verified against PyTorch."""
    from lotus.checkpoint import latest_run, load_checkpoint
    from lotus.data import DataConfig
    from lotus.export import ExportConfig
    from lotus.export import export_onnx as export_run

    source = source or latest_run()
    run_dir = source if source.is_dir() else source.parent
    if out is None:
        out = run_dir / ("model.int8.onnx" if quantize == "int8" else "model.onnx")
    _, meta = load_checkpoint(source)
    dataset = data or (meta.get("data") or {}).get("name") or meta["preprocess"].get("dataset")
    cfg = ExportConfig(opset=opset, select_block=select_block, verify=verify, quantize=quantize)
    report = export_run(
        source,
        out,
        DataConfig(dataset, data_dir=str(data_dir)) if dataset else None,
        cfg,
        log=lambda line: err.print(line, highlight=False),
    )
    print(json.dumps(report))
    err.print(f"exported {out} ({report['bytes'] / 1e6:.1f} MB) and {report['keep_idx_path']}")


@app.command()
@user_errors
def bench(
    url: Annotated[
        str | None,
        typer.Argument(help="A running `lotus serve` (or any OIP v2 server), e.g. http://127.0.0.1:8000: load it over HTTP."),
    ] = None,
    local: Annotated[
        Path | None,
        typer.Option(
            "--local", help="Time this ONNX model in ONNX Runtime, without HTTP (with URL: the HTTP overhead is the difference)."
        ),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes (--local alone).")] = "1,64",
    drops: Annotated[str, typer.Option("--drop", help="Comma-separated drop ratios.")] = "0,0.1,0.3,0.5",
    runs: Annotated[int, typer.Option(help="Timed runs per cell (--local alone; 50 at least for p99).")] = 50,
    warmup: Annotated[int | None, typer.Option(help="Untimed runs per cell (default: 5 local runs, 20 HTTP requests).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: its own choice).")] = None,
    concurrency: Annotated[str, typer.Option(help="With URL: comma-separated numbers of clients sending at once.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="With URL: timed requests per cell.")] = 200,
    duration: Annotated[float | None, typer.Option(help="With URL: seconds per cell instead of --requests.")] = None,
    batch: Annotated[int, typer.Option(help="With URL: images per request.")] = 1,
    rounds: Annotated[
        int,
        typer.Option(
            min=1, help="With URL: visit every cell this many times, round-robin, so machine drift hits all cells alike."
        ),
    ] = 1,
    name: Annotated[str, typer.Option(help="With URL: the model's name on the server.")] = "lotus",
    binary: Annotated[
        bool, typer.Option("--binary", help="With URL: send tensors in binary (Triton's extension) instead of JSON.")
    ] = False,
    api_key: Annotated[
        str | None, typer.Option(envvar="LOTUS_API_KEY", help="With URL: the server's API key (env LOTUS_API_KEY).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="With URL: PNG of latency against drop (default: beside --out).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the results here as JSON (default: beside the model; with URL: lotus-bench.json).")
    ] = None,
) -> None:
    """Latency benchmark: `URL` loads a server perf_analyzer-style; `--local model.onnx` times ONNX Runtime alone."""
    from lotus.bench import LocalBenchConfig, bench_local
    from lotus.checkpoint import atomic_write_text

    if url is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from serve.bench import HttpBenchConfig, bench_http, format_table, save_plot

        cfg = HttpBenchConfig(
            concurrency=tuple(int(c) for c in _floats(concurrency, "--concurrency")),
            drops=_floats(drops, "--drop"),
            requests=requests,
            duration=duration,
            warmup=20 if warmup is None else warmup,
            batch=batch,
            model=name,
            binary=binary,
            api_key=api_key,
            rounds=rounds,
        )
        with Progress(
            TextColumn("[bold]load cells"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as progress:
            task = progress.add_task("cells", total=None)
            result = bench_http(
                url,
                cfg,
                local=local,
                threads=threads,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        print(format_table(result))
        out = out or Path("lotus-bench.json")
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        plot = save_plot(result, plot or out.with_suffix(".png"))
        failed = sum(c["errors"] for c in result["cells"])
        err.print(f"results: {out}, plot: {plot}" + (f"; [bold red]{failed} requests failed[/]" if failed else ""))
        return
    if local is None:
        raise lotus.LotusError("pass a URL to load a server (`lotus bench http://127.0.0.1:8000`), or --local model.onnx")
    cfg = LocalBenchConfig(
        batch_sizes=tuple(int(b) for b in _floats(batch_sizes, "--batch-sizes")),
        drops=_floats(drops, "--drop"),
        runs=runs,
        warmup=5 if warmup is None else warmup,
        threads=threads,
    )
    result = bench_local(local, cfg, log=lambda line: err.print(line, highlight=False))
    print(f"{'batch':>5} {'drop':>5} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>8} {'x drop 0':>8}")
    for c in result["cells"]:
        print(
            f"{c['batch']:>5} {c['drop']:>5g} {c['median_ms']:>10.2f} {c['p90_ms']:>9.2f} {c['p99_ms']:>9.2f} "
            f"{c['images_per_second']:>8.0f} {c['vs_drop0']:>8.3f}"
        )
    out = out or local.with_suffix(".bench.json")
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    err.print(f"results: {out}")


@app.command()
@user_errors
def serve(
    model: Annotated[Path | None, typer.Argument(help="Exported ONNX model (default: the latest run's model.onnx).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes, each with its own ONNX Runtime session.")] = 1,
    name: Annotated[str, typer.Option(help="Model name in the URLs: /v2/models/NAME/infer.")] = "lotus",
    threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime intra-op threads per worker (default: its own choice).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most images gathered into one ONNX Runtime call.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(help="Longest a request waits for others to join its batch, in ms.")] = 2.0,
    batching: Annotated[
        bool, typer.Option("--batching/--no-batching", help="Gather concurrent requests into one call (dynamic batching).")
    ] = True,
    spinning: Annotated[
        bool,
        typer.Option("--spinning/--no-spinning", help="Let ONNX Runtime's idle threads spin-wait: faster calls, more CPU burnt."),
    ] = False,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MB; larger ones get 413.")] = 8.0,
    max_images: Annotated[int, typer.Option(help="Most images in one inference request.")] = 64,
    max_pixels: Annotated[int, typer.Option(help="Most pixels an uploaded image may have (image bombs get 413).")] = 40_000_000,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")] = True,
) -> None:
    """Serve an exported model over HTTP: Open Inference Protocol v2, /v1/classify, /metrics, /docs (LOTUS_API_KEY: bearer token)."""
    from pydantic import ValidationError

    from serve.app import run_server
    from serve.settings import Settings

    try:
        settings = Settings(
            model=model,
            host=host,
            port=port,
            workers=workers,
            name=name,
            threads=threads,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            batching=batching,
            spinning=spinning,
            max_body_mb=max_body_mb,
            max_images=max_images,
            max_pixels=max_pixels,
        )
    except ValidationError as e:
        from serve.protocol import validation_message

        raise lotus.LotusError(f"invalid option: {validation_message(e)}") from None
    run_server(settings, access_log=access_log)


prune_app = typer.Typer(
    help="ISSP pruning: the essential-sparsity sweep, one-shot pruning, Instant Soup Pruning.", no_args_is_help=True
)
app.add_typer(prune_app, name="prune")

ScopeOpt = Annotated[str, typer.Option(help="'global' (one magnitude ranking over all prunable weights) or 'layer'.")]
IncludeOpt = Annotated[str | None, typer.Option(help="Also prune these, comma-separated: patch_embed, head.")]


def _include(include: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in include.split(",") if x.strip()) if include else ()


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise lotus.LotusError(f"{flag} {text!r} is not a comma-separated list of numbers") from None


@prune_app.command("sweep")
@user_errors
def prune_sweep(
    checkpoint: Annotated[Path | None, typer.Option(help="LOTUS checkpoint or run folder (default: the latest run).")] = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    sparsities: Annotated[
        str | None, typer.Option(help="Comma-separated sparsities (default 0.01,0.05,0.1,0.2,...,0.5).")
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Sweep up to 0.9.")] = False,
    tolerance: Annotated[float, typer.Option(help="Accuracy points below dense that still count as no loss.")] = 1.0,
    scope: ScopeOpt = "global",
    include: IncludeOpt = None,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: a new runs/sweep-DATE-TIME).")] = None,
) -> None:
    """One-shot magnitude pruning at a list of sparsities; finds the essential sparsity (the knee)."""
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.data import DataConfig
    from lotus.prune import (
        DEFAULT_SPARSITIES,
        WIDE_SPARSITIES,
        PruneConfig,
        SweepConfig,
        sweep,
    )

    levels = _floats(sparsities, "--sparsities") if sparsities else (WIDE_SPARSITIES if wide else DEFAULT_SPARSITIES)
    cfg = SweepConfig(sparsities=levels, tolerance=tolerance, prune=PruneConfig(scope=scope, include=_include(include)))
    checkpoint = checkpoint or latest_run()
    out = out or new_run_dir("sweep")
    from lotus.train import make_progress

    with make_progress() as progress:
        task = progress.add_task("sweeping", total=len(levels), status="")
        result = sweep(
            checkpoint,
            DataConfig(data, data_dir=str(data_dir), download=download),
            cfg,
            out,
            device=device,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    for row in result["rows"]:
        print(json.dumps(row))
    err.print(
        f"dense {result['dense_accuracy']:.2f}%; essential sparsity {result['essential_sparsity']:g} "
        f"(tolerance {tolerance:g} pt); sweep: {out}"
    )


@prune_app.command("oneshot")
@user_errors
def prune_oneshot(
    checkpoint: Annotated[Path | None, typer.Option(help="LOTUS checkpoint or run folder (default: the latest run).")] = None,
    sparsity: Annotated[
        str,
        typer.Option(
            help="Fraction of the prunable weights to prune, 'auto' (the sweep's essential sparsity), or '2:4' (two zeros in every four weights)."
        ),
    ] = "auto",
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    tolerance: Annotated[float, typer.Option(help="With --sparsity auto: the sweep's tolerance in accuracy points.")] = 1.0,
    scope: ScopeOpt = "global",
    include: IncludeOpt = None,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="Output run folder (default: a new runs/oneshot-DATE-TIME).")] = None,
) -> None:
    """Stage 1: prune one-shot by global weight magnitude; saves the masked model with its masks."""
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.data import DataConfig
    from lotus.prune import PruneConfig, SweepConfig, sweep
    from lotus.prune import prune_oneshot as oneshot

    checkpoint = checkpoint or latest_run()
    data_cfg = DataConfig(data, data_dir=str(data_dir), download=download)
    prune_cfg = PruneConfig(scope=scope, include=_include(include))
    out = out or new_run_dir("oneshot")
    if sparsity == "auto":
        level = sweep(checkpoint, data_cfg, SweepConfig(tolerance=tolerance, prune=prune_cfg), out / "sweep", device=device)[
            "essential_sparsity"
        ]
        err.print(f"--sparsity auto: essential sparsity {level:g} (sweep in {out / 'sweep'})")
    else:
        level = _sparsity(sparsity)
    result = oneshot(checkpoint, level, out, prune_cfg, data_cfg=data_cfg, device=device)
    print(json.dumps({"sparsity": result["sparsity"]["overall"], "accuracy": result["accuracy"]}))
    err.print(f"measured sparsity {result['sparsity']['overall']:.4f}, accuracy {result['accuracy']:.2f}%; checkpoint: {out}")


@prune_app.command("isp")
@user_errors
def prune_isp(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Stage-1 checkpoint (or any LOTUS checkpoint; default: the latest run).")
    ] = None,
    target: Annotated[float, typer.Option(help="Overall sparsity of the prunable weights to reach.")] = 0.5,
    rounds: Annotated[int, typer.Option(help="Rounds; sparsity rises linearly to the target.")] = 2,
    copies: Annotated[int, typer.Option(help="Weak copies per round.")] = 5,
    data_fraction: Annotated[float, typer.Option(help="Share of the training data each weak copy sees.")] = 0.1,
    epochs: Annotated[int, typer.Option(help="Passes of each weak copy over its slice.")] = 1,
    lr: Annotated[float, typer.Option(help="Weak copies' learning rate.")] = 1e-4,
    merge: Annotated[
        str, typer.Option(help="'union', 'vote', 'intersection', or 'levels' (the source method's union of nested masks).")
    ] = "union",
    min_votes: Annotated[int | None, typer.Option(help="For --merge vote: copies that must keep a weight.")] = None,
    soup: Annotated[bool, typer.Option(help="Average the weak copies' weights after each round.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the slices and copies.")] = 0,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    scope: ScopeOpt = "global",
    include: IncludeOpt = None,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="Output run folder (default: a new runs/isp-DATE-TIME).")] = None,
) -> None:
    """Stage 2: Instant Soup Pruning - weak copies on small data slices propose masks that are merged."""
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.data import DataConfig
    from lotus.prune import ISPConfig, PruneConfig, isp

    cfg = ISPConfig(
        target=target,
        rounds=rounds,
        copies=copies,
        data_fraction=data_fraction,
        epochs=epochs,
        lr=lr,
        merge=merge,
        min_votes=min_votes,
        soup=soup,
        seed=seed,
        prune=PruneConfig(scope=scope, include=_include(include)),
    )
    checkpoint = checkpoint or latest_run()
    out = out or new_run_dir("isp")
    result = isp(
        checkpoint,
        DataConfig(data, data_dir=str(data_dir), download=download),
        cfg,
        out,
        device=device,
        log=lambda line: err.print(line),
    )
    print(json.dumps(result))
    err.print(
        f"target {target:g}, achieved sparsity {result['achieved_sparsity']:.4f}, "
        f"accuracy {result['rounds'][-1]['accuracy']:.2f}%; checkpoint: {out}"
    )


@prune_app.command("structured")
@user_errors
def prune_structured(
    checkpoint: Annotated[Path | None, typer.Option(help="LOTUS checkpoint or run folder (default: the latest run).")] = None,
    heads: Annotated[float, typer.Option(help="Share of the attention heads to remove (default: one in three).")] = 1 / 3,
    mlp: Annotated[float, typer.Option(help="Share of the MLP hidden neurons to remove.")] = 0.5,
    importance: Annotated[
        str, typer.Option(help="'magnitude' (weights only), 'activation' or 'taylor' (measured on calibration images).")
    ] = "magnitude",
    scope: Annotated[
        str, typer.Option(help="'block': the same share from every block; 'global': ranked across blocks.")
    ] = "block",
    calib_images: Annotated[int, typer.Option(help="Training images 'activation' and 'taylor' are measured on.")] = 512,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="Output run folder (default: a new runs/structured-DATE-TIME).")] = None,
) -> None:
    """Remove whole heads and MLP neurons, physically shrinking the model (faster on any hardware).

    Fine-tune the result with `lotus train --checkpoint OUT`, export it with `lotus export onnx`.
    """
    from lotus.checkpoint import latest_run, new_run_dir
    from lotus.data import DataConfig
    from lotus.prune import prune_structured as structured
    from lotus.structured import StructuredConfig

    cfg = StructuredConfig(heads=heads, mlp=mlp, importance=importance, scope=scope, calib_images=calib_images)
    checkpoint = checkpoint or latest_run()
    out = out or new_run_dir("structured")
    result = structured(checkpoint, out, cfg, data_cfg=DataConfig(data, data_dir=str(data_dir), download=download), device=device)
    print(json.dumps({"structure": result["structure"], "parameters": result["parameters"], "accuracy": result["accuracy"]}))
    err.print(
        f"heads per block {result['structure']['num_heads']}, MLP widths {result['structure']['mlp_hidden']}, "
        f"parameters x{result['parameters']['ratio']:.3f}, accuracy {result['accuracy']:.2f}%; checkpoint: {out}"
    )


if __name__ == "__main__":
    app()
