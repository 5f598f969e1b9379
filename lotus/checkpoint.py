"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar; atomic writes.

A checkpoint `NAME` is the pair `NAME.safetensors` + `NAME.json`. The sidecar records the
sha256 of the tensor file, so a pair torn by an interruption (new tensors, old sidecar) is
refused rather than loaded. Nothing is ever unpickled.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

import lotus
from lotus.errors import LotusError
from lotus.vit import ModelConfig, TokenGatherViT, build_model, reshape_, structure_of

FORMAT = "lotus-checkpoint/1"
MODEL_FILE = "model"  # the model checkpoint inside a run folder: model.safetensors + model.json


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, value: Any) -> None:
    """Write `value` atomically as indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` atomically as CSV: a header row, then one line per row; the columns are the first row's keys."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _with_suffix(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)  # not Path.with_suffix: 'model.v2' must stay whole


def _stem(path: str | Path) -> Path:
    """`x`, `x.safetensors` and `x.json` all name checkpoint `x`; a folder names its model checkpoint."""
    path = Path(path)
    if path.is_dir():
        return path / MODEL_FILE
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save tensors and JSON-able metadata as checkpoint `path`; returns the .safetensors path."""
    stem = _stem(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # serialised in memory, so the bytes are hashed and written atomically in one go
    blob = save(tensors)
    weights = _with_suffix(stem, ".safetensors")
    atomic_write_bytes(weights, blob)
    # the file's own fields last: a meta read from another checkpoint cannot carry a stale hash over
    sidecar = {**meta, "format": FORMAT, "lotus_version": lotus.__version__, "sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_json(_with_suffix(stem, ".json"), sidecar)
    return weights


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load checkpoint `path` (a stem, either file of the pair, or a run folder).

    Raises:
        LotusError: a file is missing, unreadable, or the pair does not belong together.
    """
    stem = _stem(path)
    weights, sidecar = _with_suffix(stem, ".safetensors"), _with_suffix(stem, ".json")
    for f in (weights, sidecar):
        if not f.is_file():
            raise LotusError(
                f"checkpoint file {f} not found: pass a LOTUS checkpoint (.safetensors with its .json) or a run folder"
            )
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LotusError(f"checkpoint sidecar {sidecar} is unreadable ({e}): re-create the checkpoint") from None
    if meta.get("format") != FORMAT:
        raise LotusError(f"{sidecar} is not a LOTUS checkpoint sidecar (format {meta.get('format')!r})")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise LotusError(f"{weights} does not match its sidecar {sidecar} (interrupted write?): re-create the checkpoint")
    return load(blob), meta


MASK_PREFIX = "mask."  # pruning masks ride in the same tensor file as the weights


def save_model(
    path: str | Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    preprocess: dict[str, Any],
    masks: dict[str, torch.Tensor] | None = None,
    **meta: Any,
) -> Path:
    """Save a model with what rebuilds it (its ModelConfig and per-block widths), what feeds it
    (its preprocessing) and its pruning masks (bool tensors, True = kept), if any."""
    tensors = dict(model.state_dict())
    tensors.update({MASK_PREFIX + name: m for name, m in (masks or {}).items()})
    meta = {"model": asdict(model_cfg), "structure": structure_of(model), "preprocess": preprocess, **meta}
    return save_checkpoint(path, tensors, meta)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TokenGatherViT, dict[str, Any]]:
    """Rebuild a model saved by `save_model`; returns it (in eval mode) and the sidecar, with
    the pruning masks under meta["masks"] ({} for a dense model).

    Raises:
        LotusError: the checkpoint does not fit its architecture, or a pruned weight is non-zero.
    """
    tensors, meta = load_checkpoint(path)
    if "model" not in meta:
        raise LotusError(f"checkpoint {_stem(path)} holds no model config: is it a training-state file?")
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    cfg = ModelConfig(**{**meta["model"], "pretrained": False})
    model = build_model(cfg)
    if meta.get("structure") and meta["structure"] != structure_of(model):  # heads or MLP neurons removed
        reshape_(model, meta["structure"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise LotusError(f"checkpoint {_stem(path)} does not fit {cfg.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, mask in masks.items():
        if name not in weights or weights[name].shape != mask.shape:
            raise LotusError(f"checkpoint {_stem(path)} has a mask for {name} that fits no weight of the model")
        if weights[name][~mask].any():
            raise LotusError(f"checkpoint {_stem(path)}: pruned weights of {name} are not zero, the masks do not hold")
    meta["masks"] = masks
    return model.to(device).eval(), meta


def new_run_dir(kind: str, root: str | Path = "runs") -> Path:
    """A fresh dated folder `runs/KIND-YYYYmmdd-HHMMSS` (suffixed if that name is taken)."""
    import time

    base = Path(root) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def latest_run(root: str | Path = "runs", containing: str = MODEL_FILE + ".json") -> Path:
    """The most recently modified run folder under `root` that holds `containing`."""
    runs = [p.parent for p in Path(root).glob(f"*/{containing}")]
    if not runs:
        raise LotusError(f"no run folder under {root}/ holds {containing}: run `lotus train` first, or pass a path")
    return max(runs, key=lambda p: (p / containing).stat().st_mtime)
