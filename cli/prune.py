"""`lotus prune`: the essential-sparsity sweep, one-shot, Instant Soup and structured pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    VAL_FRACTION,
    CheckpointOpt,
    DataDirOpt,
    DataOpt,
    DeviceOpt,
    DownloadOpt,
    ValFractionOpt,
    checked_paths,
    data_config,
    err,
    log,
    out_option,
    parse_floats,
    parse_sparsity,
    user_errors,
)
from cli.progress import progress_bars

app = typer.Typer(
    help="ISSP pruning: the essential-sparsity sweep, one-shot pruning, Instant Soup Pruning.", no_args_is_help=True
)

ScopeOpt = Annotated[str, typer.Option(help="'global' (one magnitude ranking over all prunable weights) or 'layer'.")]
IncludeOpt = Annotated[str | None, typer.Option(help="Also prune these, comma-separated: patch_embed, head.")]

SparsitiesOpt = Annotated[str | None, typer.Option(help="Comma-separated sparsities (default 0.01,0.05,0.1,0.2,...,0.5).")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Sweep up to 0.9.")]
SweepToleranceOpt = Annotated[float, typer.Option(help="Accuracy points below dense that still count as no loss.")]
SweepOutOpt = out_option("sweep", "Output folder")

SparsityOpt = Annotated[
    str,
    typer.Option(
        help="Fraction of the prunable weights to prune, 'auto' (the sweep's essential sparsity), or '2:4' (two zeros in every four weights)."
    ),
]
AutoToleranceOpt = Annotated[float, typer.Option(help="With --sparsity auto: the sweep's tolerance in accuracy points.")]
OneshotOutOpt = out_option("oneshot")

Stage1CheckpointOpt = Annotated[
    Path | None, typer.Option(help="Stage-1 checkpoint (or any LOTUS checkpoint; default: the latest run).")
]
TargetOpt = Annotated[float, typer.Option(help="Overall sparsity of the prunable weights to reach.")]
RoundsOpt = Annotated[int, typer.Option(help="Rounds; sparsity rises linearly to the target.")]
CopiesOpt = Annotated[int, typer.Option(help="Weak copies per round.")]
DataFractionOpt = Annotated[float, typer.Option(help="Share of the training data each weak copy sees.")]
CopyEpochsOpt = Annotated[int, typer.Option(help="Passes of each weak copy over its slice.")]
CopyLrOpt = Annotated[float, typer.Option(help="Weak copies' learning rate.")]
MergeOpt = Annotated[
    str, typer.Option(help="'union', 'vote', 'intersection', or 'levels' (the source method's union of nested masks).")
]
MinVotesOpt = Annotated[int | None, typer.Option(help="For --merge vote: copies that must keep a weight.")]
SoupOpt = Annotated[bool, typer.Option(help="Average the weak copies' weights after each round.")]
IspSeedOpt = Annotated[int, typer.Option(help="Seed of the slices and copies.")]
IspOutOpt = out_option("isp")

HeadsOpt = Annotated[float, typer.Option(help="Share of the attention heads to remove (default: one in three).")]
MlpOpt = Annotated[float, typer.Option(help="Share of the MLP hidden neurons to remove.")]
ImportanceOpt = Annotated[
    str, typer.Option(help="'magnitude' (weights only), 'activation' or 'taylor' (measured on calibration images).")
]
StructuredScopeOpt = Annotated[
    str, typer.Option(help="'block': the same share from every block; 'global': ranked across blocks.")
]
CalibImagesOpt = Annotated[int, typer.Option(help="Training images 'activation' and 'taylor' are measured on.")]
StructuredOutOpt = out_option("structured")


def prune_config(scope: str, include: str | None):
    """The --scope and --include options as a lotus.config.PruneConfig."""
    from lotus.config import PruneConfig

    names = tuple(x.strip() for x in include.split(",") if x.strip()) if include else ()
    return PruneConfig(scope=scope, include=names)


@app.command("sweep")
@user_errors
def prune_sweep(
    checkpoint: CheckpointOpt = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    sparsities: SparsitiesOpt = None,
    wide: WideOpt = False,
    tolerance: SweepToleranceOpt = 1.0,
    scope: ScopeOpt = "global",
    include: IncludeOpt = None,
    device: DeviceOpt = "auto",
    out: SweepOutOpt = None,
) -> None:
    """One-shot magnitude pruning at a list of sparsities; finds the essential sparsity (the knee)."""
    from lotus.config import DEFAULT_SPARSITIES, WIDE_SPARSITIES, SweepConfig

    levels = parse_floats(sparsities, "--sparsities") if sparsities else (WIDE_SPARSITIES if wide else DEFAULT_SPARSITIES)
    cfg = SweepConfig(sparsities=levels, tolerance=tolerance, prune=prune_config(scope, include))
    data_cfg = data_config(data, data_dir, download, val_fraction=val_fraction)
    checkpoint, out = checked_paths(checkpoint, data_cfg, device, out, "sweep", same_holdout=True, choice="the sweep")
    from lotus.prune import sweep  # imports torch: only once the settings are checked

    with progress_bars() as progress:
        result = sweep(checkpoint, data_cfg, cfg, out, device=device, progress=progress)
    for row in result["rows"]:
        print(json.dumps(row))
    err.print(
        f"on the validation split ({result['images']} images): dense {result['dense_accuracy']:.2f}%; "
        f"essential sparsity {result['essential_sparsity']:g} (tolerance {tolerance:g} pt); sweep: {out}"
    )


@app.command("oneshot")
@user_errors
def prune_oneshot(
    checkpoint: CheckpointOpt = None,
    sparsity: SparsityOpt = "auto",
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    tolerance: AutoToleranceOpt = 1.0,
    scope: ScopeOpt = "global",
    include: IncludeOpt = None,
    device: DeviceOpt = "auto",
    out: OneshotOutOpt = None,
) -> None:
    """Stage 1: prune one-shot by global weight magnitude; saves the masked model with its masks."""
    from lotus.config import SweepConfig

    level, prune_cfg = parse_sparsity(sparsity), prune_config(scope, include)
    sweep_cfg = SweepConfig(tolerance=tolerance, prune=prune_cfg) if level == "auto" else None
    data_cfg = data_config(data, data_dir, download, val_fraction=val_fraction)
    auto = {"same_holdout": True, "choice": "--sparsity auto"} if level == "auto" else {}
    checkpoint, out = checked_paths(checkpoint, data_cfg, device, out, "oneshot", **auto)
    from lotus.prune import prune_oneshot as oneshot  # imports torch: only once the settings are checked
    from lotus.prune import sweep

    if level == "auto":
        with progress_bars() as progress:
            swept = sweep(
                checkpoint,
                data_cfg,
                sweep_cfg,
                out / "sweep",
                device=device,
                progress=progress,
            )
        level = swept["essential_sparsity"]
        err.print(f"--sparsity auto: essential sparsity {level:g}, chosen on the validation split (sweep in {out / 'sweep'})")
    result = oneshot(checkpoint, level, out, prune_cfg, data_cfg=data_cfg, device=device)
    print(json.dumps({"sparsity": result["sparsity"]["overall"], "accuracy": result["accuracy"], "split": "test"}))
    err.print(
        f"measured sparsity {result['sparsity']['overall']:.4f}, test accuracy {result['accuracy']:.2f}%; checkpoint: {out}"
    )


@app.command("isp")
@user_errors
def prune_isp(
    checkpoint: Stage1CheckpointOpt = None,
    target: TargetOpt = 0.5,
    rounds: RoundsOpt = 2,
    copies: CopiesOpt = 5,
    data_fraction: DataFractionOpt = 0.1,
    epochs: CopyEpochsOpt = 1,
    lr: CopyLrOpt = 1e-4,
    merge: MergeOpt = "union",
    min_votes: MinVotesOpt = None,
    soup: SoupOpt = True,
    seed: IspSeedOpt = 0,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    scope: ScopeOpt = "global",
    include: IncludeOpt = None,
    device: DeviceOpt = "auto",
    out: IspOutOpt = None,
) -> None:
    """Stage 2: Instant Soup Pruning - weak copies on small data slices propose masks that are merged."""
    from lotus.config import ISPConfig

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
        prune=prune_config(scope, include),
    )
    data_cfg = data_config(data, data_dir, download, val_fraction=val_fraction)
    checkpoint, out = checked_paths(checkpoint, data_cfg, device, out, "isp", same_holdout=True)
    from lotus.prune import isp  # imports torch: only once the settings are checked

    result = isp(checkpoint, data_cfg, cfg, out, device=device, log=log)
    print(json.dumps(result))
    accuracy = result["rounds"][-1]["accuracy"]
    shown = "no validation split" if accuracy is None else f"validation accuracy {accuracy:.2f}%"
    err.print(f"target {target:g}, achieved sparsity {result['achieved_sparsity']:.4f}, {shown}; checkpoint: {out}")


@app.command("structured")
@user_errors
def prune_structured(
    checkpoint: CheckpointOpt = None,
    heads: HeadsOpt = 1 / 3,
    mlp: MlpOpt = 0.5,
    importance: ImportanceOpt = "magnitude",
    scope: StructuredScopeOpt = "block",
    calib_images: CalibImagesOpt = 512,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    device: DeviceOpt = "auto",
    out: StructuredOutOpt = None,
) -> None:
    """Remove whole heads and MLP neurons, physically shrinking the model (faster on any hardware).

    Fine-tune the result with `lotus train --checkpoint OUT`, export it with `lotus export onnx`.
    """
    from lotus.config import StructuredConfig

    cfg = StructuredConfig(heads=heads, mlp=mlp, importance=importance, scope=scope, calib_images=calib_images)
    data_cfg = data_config(data, data_dir, download, val_fraction=val_fraction)
    checkpoint, out = checked_paths(checkpoint, data_cfg, device, out, "structured")
    from lotus.prune import prune_structured as structured  # imports torch: only once the settings are checked

    result = structured(checkpoint, out, cfg, data_cfg=data_cfg, device=device)
    figures = {k: result[k] for k in ("structure", "parameters", "accuracy")}
    print(json.dumps({**figures, "split": "test"}))
    err.print(
        f"heads per block {result['structure']['num_heads']}, MLP widths {result['structure']['mlp_hidden']}, "
        f"parameters x{result['parameters']['ratio']:.3f}, test accuracy {result['accuracy']:.2f}%; checkpoint: {out}"
    )
