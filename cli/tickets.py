"""`lotus tickets`: choose the training patches kept, at random or by a model's attention, write the keep masks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import (
    VAL_FRACTION,
    DataDirOpt,
    DataOpt,
    DeviceOpt,
    DownloadOpt,
    LoaderOpt,
    ValFractionOpt,
    WorkersOpt,
    checked_paths,
    coverage_line,
    data_config,
    err,
    first_process,
    out_option,
    user_errors,
)
from cli.progress import progress_bars

if TYPE_CHECKING:
    from lotus.tickets import Tickets


class Select(str, Enum):
    random = "random"
    attention = "attention"


class Method(str, Enum):
    cls = "cls"
    rollout = "rollout"
    grad = "grad"


ScoringCheckpointOpt = Annotated[
    Path | None,
    typer.Option(help="Trained LOTUS checkpoint or run folder that scores the patches (default: the latest run)."),
]
DropOpt = Annotated[float, typer.Option(help="Fraction of each image's patches to drop, in [0, 1).")]
SelectOpt = Annotated[
    Select,
    typer.Option(
        help="'random': each image keeps K patches drawn at random (level with attention or ahead of it in every measurement, and no scoring pass); 'attention': the K the model's attention scores highest."
    ),
]
MethodOpt = Annotated[
    Method,
    typer.Option(
        help="'cls': class-token attention row; 'rollout': attention rollout; 'grad': attention weighted by the gradient of each image's label, rolled out (Chefer et al., 2021)."
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        help="Blocks whose attention scores the patches: 'all' (the default), or comma-separated, e.g. '-1' (the last) or '9,10,11'."
    ),
]
ClsSinkOpt = Annotated[bool, typer.Option(help="Replace the class token's self-attention by its row mean.")]
NormOutliersOpt = Annotated[
    bool, typer.Option(help="Replace scores of high-norm outlier patch tokens by their neighbours' mean.")
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        help="0: fixed tickets, each image's top-K patches every epoch (the published method). >0: K patches re-drawn in every batch, patch i with weight score**(1/T), 1 = in proportion to its attention; with --select random, uniform re-draws."
    ),
]
SpreadOpt = Annotated[
    int,
    typer.Option(
        help="1: keep each image's K best patches; S > 1: every S x S block of patches keeps its best first, so the kept patches cover the image."
    ),
]
BalanceOpt = Annotated[
    bool,
    typer.Option(
        "--balance",
        help="Rank each patch's score among all images' scores at its position, so every position is kept about equally often (attention tickets).",
    ),
]
FuseOpt = Annotated[
    bool,
    typer.Option(
        "--fuse", help="Train on the kept patches plus one token fusing the dropped ones, weighted by attention (EViT)."
    ),
]
TicketSeedOpt = Annotated[int, typer.Option(help="Seed of --select random.")]
ScoresFromOpt = Annotated[
    Path | None,
    typer.Option(
        help="Earlier tickets of this checkpoint and data: cut their scores again (another --drop, --spread, --temperature, --balance or --fuse) instead of scoring."
    ),
]
BoxesOpt = Annotated[
    Path | None,
    typer.Option(
        help="The data's boxes.tsv (split, path, x0 y0 x1 y1 per image): record in tickets.json how much of each image's object box the kept patches cover (object_coverage)."
    ),
]
TicketsOutOpt = out_option("tickets", "Tickets folder")


@user_errors
def tickets(
    checkpoint: ScoringCheckpointOpt = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    loader: LoaderOpt = None,
    workers: WorkersOpt = None,
    drop: DropOpt = 0.1,
    select: SelectOpt = Select.random,
    method: MethodOpt = Method.cls,
    layers: LayersOpt = None,
    cls_sink: ClsSinkOpt = True,
    norm_outliers: NormOutliersOpt = True,
    temperature: TemperatureOpt = 0.0,
    spread: SpreadOpt = 1,
    balance: BalanceOpt = False,
    fuse: FuseOpt = False,
    seed: TicketSeedOpt = 0,
    scores_from: ScoresFromOpt = None,
    boxes: BoxesOpt = None,
    device: DeviceOpt = "auto",
    out: TicketsOutOpt = None,
) -> None:
    """Choose each training image's kept patches, at random or by a model's attention, and write the keep masks (data lottery tickets)."""
    from lotus.config import TicketConfig, parse_layers
    from lotus.settings import check_boxes

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
        boxes=str(boxes) if boxes else None,
    )
    data_cfg = data_config(data, data_dir, download, val_fraction=val_fraction, loader=loader, workers=workers)
    check_boxes(data_cfg, cfg.boxes)
    checkpoint, out = checked_paths(checkpoint, data_cfg, device, out, "tickets")
    from lotus.tickets import tickets_from_checkpoint  # imports torch: only once the settings are checked

    first = first_process()  # under torchrun every process scores its share; one speaks
    with progress_bars(show=first) as progress:
        result = tickets_from_checkpoint(
            checkpoint, data_cfg, cfg, out, device=device, progress=progress, scores_from=scores_from
        )
    if first:
        summarise(result, out)


def summarise(result: Tickets, out: Path) -> None:
    """What the tickets keep, on stderr (and how much of the object boxes, when measured)."""
    m = result.meta
    how = "at random" if m["config"]["select"] == "random" else f"({m['outlier_patches']} high-norm outlier patches re-scored)"
    err.print(
        f"kept {result.num_keep} of {m['num_patches']} patches in each of {m['data']['num_images']} images {how}; tickets: {out}"
    )
    if "object_coverage" in m:
        err.print(coverage_line(m["object_coverage"]))
