"""Settings checked before work, and the recipe file that holds a compress run's settings.

Each config refuses its own bad fields when built (lotus.config); `check_settings` refuses what
is left before `lotus compress` starts a stage or writes anything: stages that do not go
together, a device that is not there, data that is not there, a checkpoint that does not fit.
`check_inputs` does the same for a command that runs one stage. Nothing here imports torch until
the last two checks that need it (whether CUDA is there, whether timm knows the architecture), so
any other bad setting is refused in a moment.
"""

from __future__ import annotations

import types
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from lotus.checkpoint import atomic_write_text, read_sidecar
from lotus.config import (
    BUILTIN_DATASETS,
    CompressConfig,
    DataConfig,
    ModelConfig,
    boxes_missing,
    check_device,
    check_holdout,
    class_labels,
    class_names,
    needs_validation,
    nm_pattern,
)
from lotus.errors import LotusError


def to_dict(cfg: Any) -> Any:
    return asdict(cfg) if is_dataclass(cfg) else cfg


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Rebuild a (nested) config dataclass from a dict; unknown keys, values of the wrong type and
    values the config refuses are an error naming the setting (`where` is the path to `cls`)."""
    hints = get_type_hints(cls)
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise LotusError(f"unknown {cls.__name__} settings in the recipe: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, str) and _fits(0.0, hint) and not _fits(value, hint):
            value = _number_or_text(value)  # YAML 1.1 reads 5e-4 (no dot) as text
        if not _fits(value, hint):
            raise LotusError(f"{where}{name} is {value!r}, not {_kind(hint)}: correct it, or delete it to take the default")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except LotusError as e:
        raise LotusError(f"{where.rstrip('.')}: {e}" if where else str(e)) from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` has type `hint` (an int counts as a float; a bool as no number)."""
    if get_origin(hint) in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_fits(item, get_args(hint)[0]) for item in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if hint is type(None) else isinstance(value, hint)


def _kind(hint: Any) -> str:
    """How a recipe writes a value of type `hint`, for error messages."""
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_kind(arg) for arg in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {_kind(get_args(hint)[0]).removeprefix('a ')}s"
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a text", type(None): "null"}
    return names.get(hint, "a mapping of settings")


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def save_recipe(cfg: CompressConfig, path: Path) -> None:
    atomic_write_text(
        path, "# lotus compress --recipe THIS_FILE repeats the run\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    )


def load_recipe(path: str | Path) -> CompressConfig:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LotusError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(values, dict):
        raise LotusError(f"recipe {path} is not a mapping of settings: write it with `lotus compress` first")
    try:
        return from_dict(CompressConfig, values)
    except LotusError as e:
        raise LotusError(f"recipe {path}: {e}") from None


def check_settings(cfg: CompressConfig) -> None:
    """Refuse, before any stage starts or anything is written, settings a later stage would fail on.

    Each config checked its own fields when it was built (`__post_init__`); what is left is
    whether stages go together (an N:M pattern survives no further pruning; 'auto' needs a
    validation split) and what needs the machine, the data and the checkpoint: the device exists,
    the data is there (and the
    tickets' boxes file, when given), the checkpoint is a LOTUS model trained on the data's classes with this
    run's validation hold-out (or, without one, the baseline's architecture is a timm ViT), and the
    ticket settings fit the model's blocks and patch grid.
    Reads no image and no weights (only the checkpoint's sidecar), so it takes a moment; only the
    two checks that need torch (is CUDA there, does timm know the architecture) load it, last.
    """
    if nm_pattern(cfg.sparsity) and (cfg.isp_target is not None or cfg.structure.enabled):
        raise LotusError(
            f"--sparsity {cfg.sparsity} keeps an N:M pattern that ISP and structured pruning would break: "
            "drop --isp-target and --structure, or use a plain sparsity"
        )
    classes = _data_classes(cfg.data)
    check_boxes(cfg.data, cfg.tickets.boxes)
    if cfg.sparsity == "auto":
        needs_validation(cfg.data, "--sparsity auto")
    if cfg.checkpoint is not None:
        meta = _model_sidecar(cfg.checkpoint, cfg.data, classes)
        check_holdout(meta, cfg.data, cfg.checkpoint)  # the pipeline trains it further and reads its validation split
        model = ModelConfig(**meta["model"])
        cfg.tickets.check_model(len(meta["structure"]["num_heads"]) if meta.get("structure") else model.depth, model.grid_size)
        _check_cuda(cfg.device)
        return
    # without --img-size the native size is known once an image is read: check the name only
    model = replace(cfg.model, img_size=cfg.data.img_size) if cfg.data.img_size else replace(cfg.model, patch_size=None)
    if cfg.data.img_size:
        model.check_grid()
        cfg.tickets.check_model(model.depth, model.grid_size)
    _check_cuda(cfg.device)
    model.check()  # the timm lookup imports torch: last


def check_inputs(
    data: DataConfig,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    *,
    same_holdout: bool = False,
    choice: str | None = None,
) -> None:
    """Refuse, before a command that runs one stage (`lotus train`, `tickets`, `prune ...`) makes
    its run folder, inputs it would fail on: data that is not there, a checkpoint that is not a
    LOTUS model trained on the data's classes, a device that is not there. Reads no image and no weights.

    Args:
        same_holdout: the command trains the checkpoint further or reads its validation split:
            refuse a checkpoint trained with another validation hold-out than `data`'s.
        choice: what the command chooses on the validation split (e.g. 'the sweep'): refuse
            data without a validation split.
    """
    classes = _data_classes(data)
    if choice is not None:
        needs_validation(data, choice)
    if checkpoint is not None:
        meta = _model_sidecar(checkpoint, data, classes)
        if same_holdout:
            check_holdout(meta, data, checkpoint)
    check_device(device)
    _check_cuda(device)


def _data_classes(data: DataConfig) -> list[str]:
    """The data's class names (the identity checkpoints are checked by), once its classes.tsv, if
    any, has been read: a malformed one is refused here, before any work."""
    classes = class_names(data)
    class_labels(data, classes)
    return classes


def check_boxes(data: DataConfig, boxes: str | Path | None) -> None:
    """Refuse `--boxes` (when given) on data that has no image files to match it to (digits,
    torchvision's CIFAR-10), or a boxes file that is not there. Reads only the file's entry."""
    if boxes is None:
        return
    if data.name in BUILTIN_DATASETS:
        raise LotusError(f"--boxes needs an ImageFolder dataset (its lines name image files), not {data.name}: pass --data PATH")
    if not Path(boxes).is_file():
        raise boxes_missing(boxes)


def _model_sidecar(checkpoint: str | Path, data: DataConfig, classes: list[str]) -> dict[str, Any]:
    """The sidecar of `--checkpoint`, refused unless it is a model trained on `classes` (those of `data`)."""
    try:
        meta = read_sidecar(checkpoint)  # the weights' hash is checked when a stage loads them
    except LotusError as e:
        raise LotusError(f"--checkpoint {checkpoint}: {e}") from None
    if "model" not in meta:
        raise LotusError(f"--checkpoint {checkpoint} holds no model: pass a model checkpoint or a run folder")
    trained_on = meta["preprocess"]["classes"]
    if trained_on != classes:
        raise LotusError(
            f"--checkpoint {checkpoint} was trained on {len(trained_on)} classes ({', '.join(trained_on[:4])}, ...), "
            f"--data {data.name} has {len(classes)} ({', '.join(classes[:4])}, ...): "
            "pass the --data it was trained on, or a checkpoint trained on this data"
        )
    return meta


def _check_cuda(device: str) -> None:
    """Refuse a CUDA device where there is none (only this needs torch, so only CUDA names pay for it)."""
    if device.startswith("cuda"):
        from lotus.device import resolve_device

        resolve_device(device)
