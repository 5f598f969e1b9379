"""What every `lotus` command shares: the stderr console, one-line errors, the dataset and
device options, and where a command's input and output folders default to."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

import lotus

if TYPE_CHECKING:
    from lotus.config import DataConfig

err = Console(stderr=True)  # messages and progress; stdout carries the results (JSON lines, tables)


def log(line: str) -> None:
    """A library function's message, on stderr above any progress bar."""
    err.print(line, highlight=False)


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
VAL_FRACTION = 0.05  # DataConfig's default
ValFractionOpt = Annotated[
    float,
    typer.Option(
        help="Share of each class of the training split held out (fixed seed, never trained on) as the validation split "
        "that choices read, e.g. the sweep's knee; 0: none. An ImageFolder with val/ beside train/ and test/ uses val/. "
        "Use the value the checkpoint was trained with."
    ),
]
CheckpointOpt = Annotated[Path | None, typer.Option(help="LOTUS checkpoint or run folder (default: the latest run).")]
LoaderOpt = Annotated[
    str | None,
    typer.Option(
        help="Where images live while a split is read: 'memory' (decoded once), 'stream' (decoded per batch by loader "
        "workers; memory does not grow with the dataset), or 'auto' (memory when the decoded split fits a quarter of RAM). "
        "[default: auto]"
    ),
]
CropPctOpt = Annotated[
    float | None,
    typer.Option(
        help="Evaluate (and serve) as timm does: resize the shorter side to img-size / crop-pct and cut out the centre, "
        "e.g. 0.9 as timm's ViT weights were evaluated. Training images stay whole. [default: resize the whole image]"
    ),
]
WorkersOpt = Annotated[int | None, typer.Option(help="Loader worker processes for streamed data. [default: min(8, cores)]")]
AugOpt = Annotated[
    str | None,
    typer.Option(
        "--aug",
        help="Training augmentation: 'crop' (pad and crop, + flip), 'rrc' (timm's RandomResizedCrop + flip), 'randaug' "
        "(rrc + timm's RandAugment), 'none', or 'auto' (crop for data in memory, rrc when streamed). [default: auto]",
    ),
]
MixupOpt = Annotated[
    float | None,
    typer.Option(
        help="timm's Mixup: blend each training image and its label with another's, Beta(alpha) weights (DeiT: 0.8). [default: 0, off]"
    ),
]
CutmixOpt = Annotated[
    float | None,
    typer.Option(
        help="timm's CutMix: paste a box of another training image, labels by area (DeiT: 1.0); with --mixup, half the batches each. [default: 0, off]"
    ),
]
DropAwareOpt = Annotated[
    str | None,
    typer.Option(
        help="Drop-aware training: each step keeps the patches the exported graph keeps (its select block's attention) "
        "at these drop ratios, in turn, e.g. 0.5 or 0.3,0.5, so the model trains as it is served."
    ),
]
AwareSelectBlockOpt = Annotated[
    int | None,
    typer.Option(
        "--select-block",
        help="With --drop-aware: the block whose attention picks the kept patches (default: depth // 6, as the export's). "
        "`lotus export onnx` then uses the same block unless told otherwise.",
    ),
]
DistillWeightOpt = Annotated[
    float | None,
    typer.Option(help="With distillation: the teacher's share of the loss, the rest label cross-entropy. [default: 0.5]"),
]
DistillTemperatureOpt = Annotated[
    float | None,
    typer.Option(help="With distillation: the temperature both predictions are softened by (Hinton et al.: 1-4). [default: 1]"),
]
CompileOpt = Annotated[
    bool | None, typer.Option("--compile/--no-compile", help="torch.compile the training step on CUDA. [default: compile]")
]
# Options of the commands that build a model. Typer has no option whose value may be left out, so
# the hub weights and a weight file are two options, named as in timm's train.py.
PretrainedPathOpt = Annotated[
    Path | None,
    typer.Option(
        help="Start from this timm weight file instead of the hub's (.safetensors, .pth, .pt, .bin or .npz, e.g. "
        "model.safetensors copied from a hub cache): timm fits it to the model as it does hub weights."
    ),
]


def pretrained_weights(pretrained: bool | None, pretrained_path: Path | None) -> bool | str | None:
    """ModelConfig.pretrained from --pretrained and --pretrained-path (the file wins: it names the weights)."""
    return str(pretrained_path) if pretrained_path is not None else pretrained


def out_option(kind: str, what: str = "Output run folder") -> Any:
    """The --out option of a command whose results go to a new `runs/KIND-DATE-TIME` by default."""
    return Annotated[Path | None, typer.Option(help=f"{what} (default: a new runs/{kind}-DATE-TIME).")]


def data_config(
    data: str,
    data_dir: Path,
    download: bool = False,
    img_size: int | None = None,
    val_fraction: float = VAL_FRACTION,
    loader: str | None = None,
    workers: int | None = None,
    crop_pct: float | None = None,
) -> DataConfig:
    """The dataset the --data, --data-dir, --download, --val-fraction, --loader, --workers and
    --crop-pct options name."""
    from lotus.config import DataConfig

    return DataConfig(
        data,
        data_dir=str(data_dir),
        download=download,
        img_size=img_size,
        val_fraction=val_fraction,
        loader=loader or "auto",
        workers=workers,
        crop_pct=crop_pct,
    )


def path_or_latest_run(path: Path | None, containing: str | None = None) -> Path:
    """`path` when the user gave one, else the newest folder under runs/ (holding `containing`)."""
    if path is not None:
        return path
    from lotus.checkpoint import latest_run

    return latest_run() if containing is None else latest_run(containing=containing)


def path_or_new_run(path: Path | None, kind: str) -> Path:
    """`path` when the user gave one, else a new `runs/KIND-DATE-TIME` folder."""
    if path is not None:
        return path
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise lotus.LotusError("under torchrun every process must name the same output folder: pass --out")
    from lotus.checkpoint import new_run_dir

    return new_run_dir(kind)


def checked_paths(
    checkpoint: Path | None, data: DataConfig, device: str, out: Path | None, kind: str, **checks: Any
) -> tuple[Path, Path]:
    """The checkpoint a stage reads (default: the latest run) and the folder it writes (default: a
    new runs/KIND-DATE-TIME), made only once the data, the checkpoint and the device are checked
    (`checks`: `lotus.settings.check_inputs`'s keyword arguments)."""
    from lotus.settings import check_inputs

    checkpoint = path_or_latest_run(checkpoint)
    check_inputs(data, checkpoint, device, **checks)
    return checkpoint, path_or_new_run(out, kind)


def first_process() -> bool:
    """False in every torchrun process but the first: one process prints and draws progress."""
    from lotus.device import distributed

    return distributed()[0] == 0


def aware(drop_aware: str | None, select_block: int | None) -> dict[str, Any]:
    """--drop-aware and --select-block as TrainConfig fields: train on the patches the exported graph keeps."""
    return ({"drop_aware": parse_floats(drop_aware, "--drop-aware")} if drop_aware else {}) | given(select_block=select_block)


def distillation(teacher: str | None, weight: float | None, temperature: float | None) -> dict[str, Any]:
    """The distillation flags as TrainConfig fields; a weight or temperature with no teacher is refused."""
    if teacher is None and (weight is not None or temperature is not None):
        raise lotus.LotusError("--distill-weight and --distill-temperature set distillation: add --distill")
    return given(distill=teacher, distill_weight=weight, distill_temperature=temperature)


def given(**values: Any) -> dict[str, Any]:
    """The options the user set (those left at None fall back to the dataset's or recipe's defaults)."""
    return {k: v for k, v in values.items() if v is not None}


def coverage_line(coverage: dict[str, Any]) -> str:
    """One line on an `object_coverage` record (see lotus.coverage)."""
    return (
        f"object boxes of {coverage['images']} images ({coverage['images_without_box']} without one): "
        f"{coverage['kept_on_object']:.1%} of the kept patches touch the object "
        f"(it touches {coverage['object_share']:.1%} of all patches), {coverage['object_kept']:.1%} of its patches are kept"
    )


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """'0,0.1,0.5' -> (0.0, 0.1, 0.5); a one-line error naming `flag` otherwise."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise lotus.LotusError(f"{flag} {text!r} is not a comma-separated list of numbers") from None


def parse_sparsity(text: str) -> float | str:
    """--sparsity: 'auto', an N:M pattern such as '2:4', or a fraction."""
    from lotus.config import nm_pattern

    return text if text == "auto" or nm_pattern(text) else parse_floats(text, "--sparsity")[0]
