"""`lotus train` and `lotus eval`: the dense baseline (or a fine-tune) and its test accuracy."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

import lotus
from cli.common import (
    VAL_FRACTION,
    AugOpt,
    AwareSelectBlockOpt,
    CompileOpt,
    CropPctOpt,
    CutmixOpt,
    DataDirOpt,
    DataOpt,
    DeviceOpt,
    DistillTemperatureOpt,
    DistillWeightOpt,
    DownloadOpt,
    DropAwareOpt,
    LoaderOpt,
    MixupOpt,
    PretrainedPathOpt,
    ValFractionOpt,
    WorkersOpt,
    aware,
    data_config,
    distillation,
    err,
    first_process,
    given,
    log,
    out_option,
    path_or_latest_run,
    path_or_new_run,
    pretrained_weights,
    user_errors,
)
from cli.progress import progress_bars

ImgSizeOpt = Annotated[int | None, typer.Option(help="Resize images to this square side (default: digits 16, others native).")]
ModelOpt = Annotated[str | None, typer.Option(help="timm VisionTransformer architecture.")]
PatchSizeOpt = Annotated[int | None, typer.Option(help="Patch side in pixels (default: 4 up to 64px images, 16 beyond).")]
DepthOpt = Annotated[int | None, typer.Option(help="Number of transformer blocks (default: the architecture's; digits 4).")]
PretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--pretrained", help="Start from timm's hub weights (needs a network); --pretrained FILE: from a local timm weight file."
    ),
]
InitCheckpointOpt = Annotated[Path | None, typer.Option(help="Start from this LOTUS checkpoint (file or run folder).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs.")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="Images per step.")]
LrOpt = Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")]
WeightDecayOpt = Annotated[float | None, typer.Option(help="AdamW weight decay.")]
WarmupOpt = Annotated[float | None, typer.Option(help="Linear warm-up length in epochs.")]
LabelSmoothingOpt = Annotated[float | None, typer.Option(help="Cross-entropy label smoothing.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for weights, batch order, augmentation and dropout.")]
TicketsOpt = Annotated[
    Path | None, typer.Option(help="Train on the kept patches of these data lottery tickets (a `lotus tickets` folder).")
]
DistillOpt = Annotated[
    Path | None,
    typer.Option(
        help="Knowledge distillation: also learn this LOTUS checkpoint's predictions on each whole training image "
        "(e.g. the dense model a pruned or drop-aware one is fine-tuned from); same classes and preprocessing."
    ),
]
TrainOutOpt = out_option("train", "Run folder")
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out (default: the latest run) from its last finished epoch.")
]
EvalCheckpointArg = Annotated[Path | None, typer.Argument(help="LOTUS checkpoint or run folder (default: the latest run).")]
EvalBatchSizeOpt = Annotated[int, typer.Option(help="Images per forward pass.")]


@user_errors
def train(
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    img_size: ImgSizeOpt = None,
    loader: LoaderOpt = None,
    workers: WorkersOpt = None,
    crop_pct: CropPctOpt = None,
    model: ModelOpt = None,
    patch_size: PatchSizeOpt = None,
    depth: DepthOpt = None,
    pretrained: PretrainedOpt = False,
    pretrained_path: PretrainedPathOpt = None,
    checkpoint: InitCheckpointOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    weight_decay: WeightDecayOpt = None,
    warmup_epochs: WarmupOpt = None,
    label_smoothing: LabelSmoothingOpt = None,
    aug: AugOpt = None,
    mixup: MixupOpt = None,
    cutmix: CutmixOpt = None,
    compile: CompileOpt = None,
    drop_aware: DropAwareOpt = None,
    select_block: AwareSelectBlockOpt = None,
    distill: DistillOpt = None,
    distill_weight: DistillWeightOpt = None,
    distill_temperature: DistillTemperatureOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    tickets: TicketsOpt = None,
    out: TrainOutOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Train a ViT (the dense baseline): AdamW, warm-up + cosine, label smoothing, resumable."""
    from lotus.config import default_configs
    from lotus.settings import check_inputs

    data_cfg, model_cfg, train_cfg = default_configs(data)  # the dataset's defaults, under the flags given
    data_cfg = data_config(data, data_dir, download, img_size or data_cfg.img_size, val_fraction, loader, workers, crop_pct)
    weights = pretrained_weights(pretrained, pretrained_path)
    model_cfg = replace(model_cfg, pretrained=weights, **given(name=model, patch_size=patch_size, depth=depth))
    schedule = given(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs)
    recipe = given(label_smoothing=label_smoothing, seed=seed, augment=aug, mixup=mixup, cutmix=cutmix, compile=compile)
    teacher = distillation(str(distill) if distill else None, distill_weight, distill_temperature)
    train_cfg = replace(train_cfg, device=device, **schedule, **recipe, **aware(drop_aware, select_block), **teacher)
    check_inputs(data_cfg, checkpoint, device, model=model_cfg, same_holdout=True)  # refused before a run folder is made
    out = run_folder(out, resume)
    from lotus.train import train as train_run  # imports torch: only once the settings are checked

    with progress_bars(show=first_process()) as progress:
        start = dict(init_checkpoint=checkpoint, tickets=tickets, resume=resume)
        history = train_run(data_cfg, model_cfg, train_cfg, out, **start, progress=progress, log=log)
    err.print(
        f"test accuracy {history[-1]['test_accuracy']:.2f}% after {len(history)} epochs; checkpoint: {out / 'model.safetensors'}"
    )


def run_folder(out: Path | None, resume: bool) -> Path:
    """--out, or by default a new run folder (with --resume: the latest run that can be resumed)."""
    from lotus.train import STATE_FILE

    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise lotus.LotusError("under torchrun every process must name the same run folder: pass --out")
    return path_or_latest_run(out, containing=f"{STATE_FILE}.json") if resume else path_or_new_run(out, "train")


@user_errors
def eval_(
    checkpoint: EvalCheckpointArg = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = Path("data"),
    download: DownloadOpt = False,
    batch_size: EvalBatchSizeOpt = 256,
    device: DeviceOpt = "auto",
) -> None:
    """Evaluate a checkpoint on a dataset's test split; prints one JSON line."""
    from lotus.train import evaluate_checkpoint

    result = evaluate_checkpoint(path_or_latest_run(checkpoint), data_config(data, data_dir, download), batch_size, device)
    print(json.dumps(result))
