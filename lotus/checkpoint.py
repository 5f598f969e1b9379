"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar; atomic writes.

A checkpoint `NAME` is the pair `NAME.safetensors` + `NAME.json`. The sidecar records the
sha256 of the tensor file, so tensors that do not belong to it are refused rather than loaded.
Nothing is ever unpickled.

A save never tears the pair. It writes the new tensors beside the old pair, as
`.NAME.<sha256[:16]>.safetensors`, then replaces the sidecar: that one atomic rename is the
switch from the old checkpoint to the new one. Only then do the new tensors take the name
`NAME.safetensors`. A save that fails before the switch leaves the old pair as it was; one that
fails after it leaves the new sidecar, whose tensors the loader finds under the pending name.
Whatever a failed or killed save leaves behind, the next successful save removes.

Importing this module does not import torch (the functions that handle tensors do), so the
settings check reads sidecars and commands make run folders without waiting for it.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import lotus
from lotus.config import ModelConfig
from lotus.errors import LotusError

if TYPE_CHECKING:
    import torch

    from lotus.vit import TokenGatherViT

FORMAT = "lotus-checkpoint/1"
MODEL_FILE = "model"  # the model checkpoint inside a run folder: model.safetensors + model.json


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part.

    The bytes reach the disk before the rename, and the rename before this returns; the
    temporary files of earlier writes of `path` that were killed midway are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: another process writing the same file (a DDP rank) keeps its own
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    _remove(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]  # os.write may write less than asked


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (POSIX only: Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(paths: Iterable[Path]) -> None:
    """Delete leftover files, best effort: what cannot be deleted now goes at a later save. A
    temporary file of a process still running is left alone: it may be writing it now."""
    for path in list(paths):
        if path.suffix == ".tmp" and not _abandoned(path):
            continue
        with contextlib.suppress(OSError):
            path.unlink()


def _abandoned(tmp: Path) -> bool:
    """Whether the process that made temporary file `.NAME.PID.RANDOM.tmp` is this one or gone."""
    try:
        pid = int(tmp.name[: -len(".tmp")].rsplit(".", 2)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True  # saves are synchronous: this process is not writing it any more
    if os.name != "posix":
        return False  # os.kill(pid, 0) would end the process on Windows: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


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


def _pending(stem: Path, digest: str) -> Path:
    """Where a save puts new tensors until its sidecar names them: beside the pair, named by their sha256."""
    return stem.parent / f".{stem.name}.{digest[:16]}.safetensors"


def _leftovers(stem: Path) -> list[Path]:
    """What failed or killed saves of checkpoint `stem` may have left: pending tensors, temporary files."""
    name, hex16 = glob.escape(stem.name), "[0-9a-f]" * 16
    patterns = (f".{name}.{hex16}.safetensors", f"..{name}.{hex16}.safetensors.*.tmp", f".{name}.safetensors.*.tmp")
    return [p for pattern in patterns for p in stem.parent.glob(pattern)]


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save tensors and JSON-able metadata as checkpoint `path`; returns the .safetensors path.

    If it fails (disk full, killed), the checkpoint loads as it was before, or, once the new
    sidecar is in place, as the new one: never a mix (see the module's docstring)."""
    from safetensors.torch import save

    stem = _stem(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # serialised in memory, so the bytes are hashed and written atomically in one go
    blob = save(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    pending, weights = _pending(stem, digest), _with_suffix(stem, ".safetensors")
    atomic_write_bytes(pending, blob)
    # the file's own fields last: a meta read from another checkpoint cannot carry a stale hash over
    sidecar = {**meta, "format": FORMAT, "lotus_version": lotus.__version__, "sha256": digest}
    atomic_write_json(_with_suffix(stem, ".json"), sidecar)  # the switch to the new checkpoint
    _rename_pending(stem, pending)
    return weights


def _rename_pending(stem: Path, pending: Path) -> None:
    """Give the tensors the sidecar names the pair's name, and sweep what failed saves left."""
    weights = _with_suffix(stem, ".safetensors")
    try:
        os.replace(pending, weights)
    except FileNotFoundError:
        # another process saving the same tensors (a DDP rank) renamed or swept them first
        digest16 = pending.name.rsplit(".", 2)[1]
        if not (weights.is_file() and hashlib.sha256(weights.read_bytes()).hexdigest().startswith(digest16)):
            raise
    _fsync_dir(stem.parent)
    _remove(_leftovers(stem))


def finish_interrupted_save(path: str | Path) -> None:
    """Finish a save of checkpoint `path` that failed after its switch (its tensors still under
    the pending name) and remove what failed saves left; best effort, as a later save does the
    same. Call it from the one process that writes the checkpoint; loading never needs it."""
    stem = _stem(path)
    try:
        digest = json.loads(_with_suffix(stem, ".json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # never saved, or a sidecar that loading refuses anyway
    pending = _pending(stem, str(digest))
    with contextlib.suppress(OSError):
        if pending.is_file():
            _rename_pending(stem, pending)
        else:
            _remove(_leftovers(stem))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of checkpoint `path`, without reading its tensors (a quick look at what it holds).

    Raises:
        LotusError: the sidecar is missing, unreadable or not a LOTUS sidecar.
    """
    stem = _stem(path)
    weights, sidecar = _with_suffix(stem, ".safetensors"), _with_suffix(stem, ".json")
    if not sidecar.is_file():
        _not_found(sidecar if weights.is_file() else weights)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LotusError(f"checkpoint sidecar {sidecar} is unreadable ({e}): re-create the checkpoint") from None
    if meta.get("format") != FORMAT:
        raise LotusError(f"{sidecar} is not a LOTUS checkpoint sidecar (format {meta.get('format')!r})")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load checkpoint `path` (a stem, either file of the pair, or a run folder).

    Raises:
        LotusError: a file is missing, unreadable, or the pair does not belong together.
    """
    from safetensors.torch import load

    meta = read_sidecar(path)
    stem = _stem(path)
    weights, sidecar = _with_suffix(stem, ".safetensors"), _with_suffix(stem, ".json")
    digest, pending = str(meta.get("sha256")), _pending(stem, str(meta.get("sha256")))
    if not weights.is_file() and not pending.is_file():
        _not_found(weights)
    # the pair's own file, or else the tensors a save switched to but did not get to rename; the
    # second look at the pair's file: `finish_interrupted_save` may have renamed them meanwhile
    for f in (weights, pending, weights):
        with contextlib.suppress(FileNotFoundError):
            blob = f.read_bytes()
            if hashlib.sha256(blob).hexdigest() == digest:
                return load(blob), meta
    raise LotusError(f"{weights} does not match its sidecar {sidecar} (changed after saving?): re-create the checkpoint")


# safetensors dtype -> numpy dtype, for the tensors `map_checkpoint` maps (bf16 has no numpy form)
NUMPY_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16"}
NUMPY_DTYPES |= {"I8": "int8", "U8": "uint8", "BOOL": "bool"}


def map_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`load_checkpoint`, but the tensors stay in the file: memory-mapped, so rows are read from
    disk (or the page cache, shared by every process reading the file) only as they are indexed.
    For files too large to hold in each process's memory, such as a large dataset's tickets.
    The file is checked against its sidecar's sha256 first, a megabyte at a time.

    Raises:
        LotusError: as `load_checkpoint`.
    """
    import numpy as np
    import torch

    meta = read_sidecar(path)
    stem = _stem(path)
    weights, digest = _with_suffix(stem, ".safetensors"), str(meta.get("sha256"))
    pending = _pending(stem, digest)
    if not weights.is_file() and not pending.is_file():
        _not_found(weights)
    for f in (weights, pending, weights):  # as in load_checkpoint: a save may be finishing meanwhile
        with contextlib.suppress(FileNotFoundError), f.open("rb") as fh:
            h = hashlib.sha256()
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            if h.hexdigest() != digest:
                continue
            fh.seek(0)
            length = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(length))
            tensors = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape = np.dtype(NUMPY_DTYPES[info["dtype"]]), tuple(info["shape"])
                begin = info["data_offsets"][0]
                if not math.prod(shape):
                    tensors[name] = torch.from_numpy(np.zeros(shape, dtype))
                    continue
                # copy-on-write: torch gets a writable array, the file is never written
                array = np.memmap(f, dtype=dtype, mode="c", offset=8 + length + begin, shape=shape)
                tensors[name] = torch.from_numpy(array)
            return tensors, meta
    raise LotusError(f"{weights} does not match its sidecar (changed after saving?): re-create the checkpoint")


def _not_found(path: Path) -> NoReturn:
    raise LotusError(f"checkpoint file {path} not found: pass a LOTUS checkpoint (.safetensors with its .json) or a run folder")


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
    from lotus.vit import structure_of

    tensors = dict(model.state_dict())
    tensors.update({MASK_PREFIX + name: m for name, m in (masks or {}).items()})
    meta = {"model": asdict(model_cfg), "structure": structure_of(model), "preprocess": preprocess, **meta}
    return save_checkpoint(path, tensors, meta)


def labels_of(preprocess: dict[str, Any]) -> list[str]:
    """The names people see for a model's classes, in logit order: its preprocessing record's
    `labels`, or its `classes` (checkpoints saved before labels were recorded)."""
    return list(preprocess.get("labels") or preprocess["classes"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TokenGatherViT, dict[str, Any]]:
    """Rebuild a model saved by `save_model`; returns it (in eval mode) and the sidecar, with
    the pruning masks under meta["masks"] ({} for a dense model).

    Raises:
        LotusError: the checkpoint does not fit its architecture, or a pruned weight is non-zero.
    """
    from lotus.vit import build_model, reshape_, structure_of

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
