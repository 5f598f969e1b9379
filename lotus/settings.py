"""Settings checked before work, and the recipe file that holds a compress run's settings.

Each config refuses its own bad fields when built (lotus.config); `check_settings` refuses what
is left before `lotus compress` starts a stage or writes anything: stages that do not go
together, a device that is not there, data that is not there, a checkpoint that does not fit,
a weight file that is not there or does not fit the model. `check_inputs` does the same for a
command that runs one stage. Nothing here imports torch until the last checks that need it
(whether CUDA is there, whether timm knows the architecture, whether a weight file fits it), so
any other bad setting is refused in a moment.
"""

from __future__ import annotations

import json
import types
import zipfile
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Union, get_args, get_origin, get_type_hints

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
    weight_file_missing,
)
from lotus.drop import select_block_of
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
    run's validation hold-out (or, without one, the baseline's architecture is a timm ViT and its
    weight file, if any, fits it), and the ticket settings fit the model's blocks and patch grid.
    Reads no image and no weights (only the checkpoint's sidecar) but a --pretrained-path file's,
    so it takes a moment; only the checks that need torch (is CUDA there, does timm know the
    architecture, does the weight file fit it) load it, last.
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
        depth = len(meta["structure"]["num_heads"]) if meta.get("structure") else model.depth
        cfg.tickets.check_model(depth, model.grid_size)
        if cfg.finetune.drop_aware:
            select_block_of(depth, cfg.finetune.select_block)
        _check_cuda(cfg.device)
        return
    model = _model_to_build(cfg.model, cfg.data)
    if cfg.data.img_size:
        cfg.tickets.check_model(model.depth, model.grid_size)
    if cfg.finetune.drop_aware and model.depth:  # else the architecture's depth, known once timm builds it
        select_block_of(model.depth, cfg.finetune.select_block)
    _check_cuda(cfg.device)
    _check_model(model)  # imports torch: last


def check_inputs(
    data: DataConfig,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    *,
    model: ModelConfig | None = None,
    same_holdout: bool = False,
    choice: str | None = None,
) -> None:
    """Refuse, before a command that runs one stage (`lotus train`, `tickets`, `prune ...`) makes
    its run folder, inputs it would fail on: data that is not there, a checkpoint that is not a
    LOTUS model trained on the data's classes, a model LOTUS cannot build or whose weight file does
    not fit it, a device that is not there. Reads no image and no weights but a weight file's.

    Args:
        model: the model the command builds when no checkpoint is given (`lotus train`); with a
            checkpoint, refused when it asks for pretrained weights (the checkpoint's are used).
        same_holdout: the command trains the checkpoint further or reads its validation split:
            refuse a checkpoint trained with another validation hold-out than `data`'s.
        choice: what the command chooses on the validation split (e.g. 'the sweep'): refuse
            data without a validation split.
    """
    classes = _data_classes(data)
    if choice is not None:
        needs_validation(data, choice)
    if checkpoint is not None:
        if model is not None and model.pretrained:
            flag = "--pretrained-path" if model.pretrained_file else "--pretrained"
            raise LotusError(f"--checkpoint {checkpoint} and {flag} both give the starting weights: pass one of them")
        meta = _model_sidecar(checkpoint, data, classes)
        if same_holdout:
            check_holdout(meta, data, checkpoint)
    elif model is not None:
        model = _model_to_build(model, data)
    check_device(device)
    _check_cuda(device)
    if checkpoint is None and model is not None:
        _check_model(model)  # imports torch: last


def _model_to_build(model: ModelConfig, data: DataConfig) -> ModelConfig:
    """`model` at the data's image size, refused if its patches do not tile it; its weight file,
    if any, checked without torch. Without --img-size the native size is known once an image is
    read: the patch size is then left to it."""
    if data.img_size:
        model = replace(model, img_size=data.img_size)
        model.check_grid()
    else:
        model = replace(model, patch_size=None)
    if model.pretrained_file is not None:
        check_weight_file(model.pretrained_file)
    return model


def _check_model(model: ModelConfig) -> None:
    """Refuse an architecture timm does not have or LOTUS cannot build, and a weight file whose
    weights do not fit it (loaded into a model without values: a moment, nothing initialised)."""
    model.check()
    if model.pretrained_file is not None:
        from lotus.vit import check_weights_fit

        check_weights_fit(model)


def check_weight_file(path: str | Path) -> None:
    """Refuse a --pretrained-path that is not there or that timm could not read, without torch:
    a .safetensors file's header must account for its length, an .npz or torch file (.pth, .pt,
    .bin) must be a whole zip archive (torch's format; an old pickle is left to torch). Reads a few
    bytes: whether the weights fit the model is known once they are loaded (`_check_model`)."""
    file = Path(path)
    if not file.exists():
        raise weight_file_missing(path)
    if file.is_dir():
        raise LotusError(
            f"--pretrained-path {path} is a folder: pass the weight file in it (a hub cache snapshot holds model.safetensors)"
        )
    try:
        with file.open("rb") as f:
            if file.suffix == ".safetensors":
                whole = _whole_safetensors(f, file.stat().st_size)
            else:
                whole = _whole_archive(f, file.suffix)
    except OSError as e:
        raise LotusError(f"cannot read --pretrained-path {path} ({e.strerror or e}): check its permissions") from None
    if not whole:
        raise LotusError(
            f"--pretrained-path {path} is not a whole {file.suffix} file (cut short, or another format?): copy it again"
        )


def _whole_safetensors(f: BinaryIO, size: int) -> bool:
    """Whether `f` is a safetensors file of `size` bytes: an 8-byte header length, a JSON header,
    then the tensors' bytes, which end where the header says the last one ends."""
    head = f.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else size
    if header_size > size - 8:
        return False
    try:
        header = json.loads(f.read(header_size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
        return False
    return 8 + header_size + end == size


def _whole_archive(f: BinaryIO, suffix: str) -> bool:
    """Whether `f` is a zip archive with its table of contents (numpy's .npz, torch's files), or
    a torch file from before torch 1.6 (a pickle: protocol 2 opens with byte 0x80)."""
    if zipfile.is_zipfile(f):
        return True
    f.seek(0)
    return suffix != ".npz" and f.read(1) == b"\x80"


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
