"""`lotus compress`: the whole pipeline from one recipe, each flag overriding one recipe field.

Flags left out keep the recipe's value (or the dataset's default recipe), so their options
default to None here and the help text names the default the recipe brings.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import lotus
from cli.common import (
    AugOpt,
    AwareSelectBlockOpt,
    CompileOpt,
    CropPctOpt,
    CutmixOpt,
    DropAwareOpt,
    LoaderOpt,
    MixupOpt,
    PretrainedPathOpt,
    WorkersOpt,
    aware,
    err,
    first_process,
    given,
    log,
    out_option,
    parse_floats,
    path_or_latest_run,
    path_or_new_run,
    pretrained_weights,
    user_errors,
)
from cli.progress import progress_bars
from cli.tickets import Select

if TYPE_CHECKING:
    from lotus.config import CompressConfig

SparsityOpt = Annotated[
    str | None,
    typer.Option(
        help="Stage-1 one-shot sparsity of the prunable weights, 'auto' (the sweep's essential sparsity), or '2:4' (NVIDIA sparse tensor cores). [default: 0.3]"
    ),
]
DropOpt = Annotated[
    float | None,
    typer.Option(help="Fraction of each training image's patches dropped (data lottery tickets). [default: 0.1]"),
]
DistillOpt = Annotated[
    bool | None,
    typer.Option(
        "--distill/--no-distill",
        help="Fine-tune learning also the dense model's predictions on each whole image (knowledge distillation: "
        "the pruned or drop-aware model learns what the model it came from sees). [default: off]",
    ),
]
IspTargetOpt = Annotated[float | None, typer.Option(help="Stage-2 Instant Soup Pruning target sparsity (off when not given).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Fine-tuning epochs on the lottery data. [default: 5]")]
CheckpointOpt = Annotated[
    Path | None, typer.Option(help="Dense LOTUS checkpoint to compress (default: train the baseline first).")
]
ModelOpt = Annotated[str | None, typer.Option(help="timm ViT for the baseline when no --checkpoint.")]
PretrainedOpt = Annotated[
    bool | None,
    typer.Option(
        "--pretrained",
        help="Start the baseline from timm's hub weights (needs a network); --pretrained FILE: from a weight file.",
    ),
]
DataOpt = Annotated[str | None, typer.Option("--data", help="'digits' (default), 'cifar10', or an ImageFolder root.")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Folder holding torchvision's CIFAR-10.")]
DownloadOpt = Annotated[bool | None, typer.Option("--download", help="Let torchvision download CIFAR-10.")]
ValFractionOpt = Annotated[
    float | None,
    typer.Option(
        help="Share of each training class held out as the validation split that choices read (--sparsity auto); "
        "0: none. An ImageFolder with val/ beside train/ and test/ uses val/. [default: 0.05]"
    ),
]
SelectOpt = Annotated[
    Select | None, typer.Option(help="Ticket selection: 'random' (default) or 'attention' (see `lotus tickets`).")
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(
        help="Ticket sampling: 0 keeps each image's top-K (default); >0 re-draws K patches per batch, weight score**(1/T) (see `lotus tickets`)."
    ),
]
SpreadOpt = Annotated[
    int | None,
    typer.Option(help="Tickets: S > 1 keeps the best of every S x S block of patches first (see `lotus tickets`). [default: 1]"),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        help="Tickets: blocks whose attention scores the patches, 'all' or e.g. '9,10,11' (see `lotus tickets`). [default: all]"
    ),
]
BalanceOpt = Annotated[
    bool | None,
    typer.Option(
        "--balance",
        help="Tickets: rank scores by patch position, so every position is kept about equally often (see `lotus tickets`).",
    ),
]
FuseOpt = Annotated[
    bool | None, typer.Option("--fuse", help="Tickets: one more token fusing the dropped patches (see `lotus tickets`).")
]
BoxesOpt = Annotated[
    Path | None,
    typer.Option(
        help="Tickets: the data's boxes.tsv, to record how much of each image's object box the tickets keep (see `lotus tickets`)."
    ),
]
StructureOpt = Annotated[
    str | None,
    typer.Option(
        help="Structured pruning before fine-tuning, e.g. 'heads=0.34,mlp=0.5' (shares removed; see `lotus prune structured`)."
    ),
]
StructureImportanceOpt = Annotated[
    str | None, typer.Option(help="With --structure: 'magnitude' (default), 'activation' or 'taylor'.")
]
StructureScopeOpt = Annotated[
    str | None, typer.Option(help="With --structure: 'block' (the same share of every block, default) or 'global'.")
]
ToleranceOpt = Annotated[
    float | None, typer.Option(help="With --sparsity auto: accuracy points below dense still counted as no loss.")
]
ImgSizeOpt = Annotated[int | None, typer.Option(help="Resize images to this square side (default: the recipe's, else native).")]
RecipeOpt = Annotated[Path | None, typer.Option(help="Repeat a run from its recipe.yaml (flags given here override it).")]
DeviceOpt = Annotated[str | None, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")]
OutOpt = out_option("compress", "Run folder")
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue the run in --out (default: the latest compress run), skipping finished stages."),
]


@user_errors
def compress(
    sparsity: SparsityOpt = None,
    drop: DropOpt = None,
    isp_target: IspTargetOpt = None,
    epochs: EpochsOpt = None,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    pretrained_path: PretrainedPathOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    val_fraction: ValFractionOpt = None,
    img_size: ImgSizeOpt = None,
    loader: LoaderOpt = None,
    workers: WorkersOpt = None,
    crop_pct: CropPctOpt = None,
    aug: AugOpt = None,
    mixup: MixupOpt = None,
    cutmix: CutmixOpt = None,
    compile: CompileOpt = None,
    drop_aware: DropAwareOpt = None,
    select_block: AwareSelectBlockOpt = None,
    distill: DistillOpt = None,
    select: SelectOpt = None,
    temperature: TemperatureOpt = None,
    spread: SpreadOpt = None,
    layers: LayersOpt = None,
    balance: BalanceOpt = None,
    fuse: FuseOpt = None,
    boxes: BoxesOpt = None,
    structure: StructureOpt = None,
    structure_importance: StructureImportanceOpt = None,
    structure_scope: StructureScopeOpt = None,
    tolerance: ToleranceOpt = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """The whole LOTUS pipeline: baseline -> tickets -> prune -> (ISP) -> (structured) -> fine-tune on lottery data -> evaluate -> report."""
    from lotus.settings import check_settings  # without torch: a bad setting is refused in a moment

    recipe, out = resumed_recipe(recipe, out, resume)
    cfg = starting_config(recipe, data)
    training = given(augment=aug, mixup=mixup, cutmix=cutmix, compile=compile)  # the baseline's and the fine-tuning's
    cfg = replace(
        cfg,
        data=replace(cfg.data, **data_flags(data_dir, download, val_fraction, img_size, loader, workers, crop_pct)),
        baseline=replace(cfg.baseline, **training),
        model=replace(cfg.model, **given(name=model, pretrained=pretrained_weights(pretrained, pretrained_path))),
        tickets=replace(cfg.tickets, **ticket_flags(drop, select, temperature, spread, layers, balance, fuse, boxes)),
        sweep=replace(cfg.sweep, **given(tolerance=tolerance)),
        finetune=replace(cfg.finetune, **training, **given(epochs=epochs), **aware(drop_aware, select_block), **teacher(distill)),
        structure=replace(cfg.structure, **structure_flags(structure, structure_importance, structure_scope)),
        # the config reads a --sparsity of '0.3', 'auto' and '2:4' alike, and refuses anything else
        **given(checkpoint=str(checkpoint) if checkpoint else None, device=device, isp_target=isp_target, sparsity=sparsity),
    )
    check_settings(cfg)  # before a new run folder is made for it
    run_pipeline(cfg, path_or_new_run(out, "compress"), resume)


def teacher(distill: bool | None) -> dict[str, Any]:
    """--distill/--no-distill as fine-tuning's teacher: the run's dense baseline, or none (the
    recipe's `finetune.distill_weight` and `distill_temperature` set how it teaches)."""
    from lotus.config import BASELINE_TEACHER

    return {} if distill is None else {"distill": BASELINE_TEACHER if distill else None}


def resumed_recipe(recipe: Path | None, out: Path | None, resume: bool) -> tuple[Path | None, Path | None]:
    """With --resume and no --recipe: the run to continue (--out, else the latest compress run)
    and the recipe it was started with, so it continues with the same settings."""
    if not resume or recipe is not None:
        return recipe, out
    out = path_or_latest_run(out, containing="recipe.yaml")
    return (out / "recipe.yaml" if (out / "recipe.yaml").exists() else None), out


def starting_config(recipe: Path | None, data: str | None) -> CompressConfig:
    """The recipe file's settings (on another --data when given), or the dataset's default recipe."""
    from lotus.config import default_compress_config
    from lotus.settings import load_recipe

    if recipe is None:
        return default_compress_config(data or "digits")
    cfg = load_recipe(recipe)
    return cfg if data is None else replace(cfg, data=replace(cfg.data, name=data))


def data_flags(
    data_dir: Path | None,
    download: bool | None,
    val_fraction: float | None,
    img_size: int | None,
    loader: str | None,
    workers: int | None,
    crop_pct: float | None = None,
) -> dict[str, Any]:
    """The DataConfig fields the data flags set."""
    data_dir = str(data_dir) if data_dir else None
    return given(
        data_dir=data_dir,
        download=download,
        val_fraction=val_fraction,
        img_size=img_size,
        loader=loader,
        workers=workers,
        crop_pct=crop_pct,
    )


def ticket_flags(
    drop: float | None,
    select: Select | None,
    temperature: float | None,
    spread: int | None,
    layers: str | None,
    balance: bool | None,
    fuse: bool | None,
    boxes: Path | None = None,
) -> dict[str, Any]:
    """The TicketConfig fields the ticket flags set."""
    from lotus.config import parse_layers

    return given(
        drop=drop,
        select=select.value if select else None,
        temperature=temperature,
        spread=spread,
        layers=parse_layers(layers),
        balance=balance,
        fuse=fuse,
        boxes=str(boxes) if boxes else None,
    )


def structure_flags(structure: str | None, importance: str | None, scope: str | None) -> dict[str, Any]:
    """The StructuredConfig fields --structure 'heads=0.34,mlp=0.5' and its two companions set."""
    shares = {}
    for item in structure.split(",") if structure is not None else ():
        key, _, value = item.partition("=")
        if key.strip() not in ("heads", "mlp"):
            raise lotus.LotusError(f"--structure {structure!r}: write it as heads=FRACTION,mlp=FRACTION (either may be left out)")
        shares[key.strip()] = parse_floats(value, f"--structure {key.strip()}")[0]
    return shares | given(importance=importance, scope=scope)


def run_pipeline(cfg: CompressConfig, out: Path, resume: bool) -> None:
    """Run every stage into `out`, showing their epochs; under torchrun, one process speaks."""
    from lotus.pipeline import compress as compress_run

    first = first_process()
    with progress_bars(show=first) as progress:
        metrics = compress_run(cfg, out, resume=resume, log=log if first else lambda line: None, progress=progress)
    if not first:
        return
    keys = ("dense_accuracy", "compressed_accuracy", "dense_val_accuracy", "compressed_val_accuracy")
    keys += ("sparsity", "drop", "essential_sparsity")
    splits = {k: split for k, split in metrics["splits"].items() if k in keys}  # the split of each figure printed
    print(json.dumps({**{k: metrics[k] for k in keys}, "splits": splits}))
    err.print(
        f"test accuracy: dense {metrics['dense_accuracy']:.2f}% -> compressed {metrics['compressed_accuracy']:.2f}% at sparsity "
        f"{metrics['sparsity']:.3f}, drop {metrics['drop']:g}; report: {out / 'report.md'}"
    )
