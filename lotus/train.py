"""Training and evaluation: AdamW, warm-up + cosine schedule, label smoothing, resumable.

`train` is what `lotus train` runs: load data, build (or load) the model, `fit`, save.
`fit` is the loop itself, reading top to bottom: batch -> loss -> backward -> step -> log.
The order of batches, the augmentation and the dropout noise of epoch `e` depend only on
(seed, e), and the optimizer state is checkpointed at every epoch end, so a run resumed after
an interruption ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lotus.checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from lotus.data import (
    Batch,
    BatchLoader,
    DataConfig,
    ImageData,
    default_augment,
    load_split,
    load_split_for_model,
)
from lotus.device import autocast, distributed, resolve_device, weights_digest
from lotus.errors import LotusError
from lotus.masks import Masks, enforce_masks_
from lotus.tickets import load_tickets
from lotus.vit import ModelConfig, TokenGatherViT, build_model, default_patch_size

STATE_FILE = "train_state"  # resumable state in a run folder: model + optimizer + epoch
METRICS_FILE = "metrics.jsonl"  # one JSON line per epoch

console = Console(stderr=True)  # progress and messages; stdout carries the JSON metrics lines


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_epochs: float = 2.0  # linear warm-up from 0, in epochs
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, embeddings)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0  # seeds the weights, the batch order, augmentation and dropout
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate at optimizer step `step`: linear warm-up to `peak`, cosine decay to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: BatchLoader, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy (in percent), mean cross-entropy and throughput on a split."""
    model.eval()
    correct, loss_sum, seen = 0, 0.0, 0
    start = time.perf_counter()
    for batch in loader:
        with autocast(device):
            logits = model(batch.images.to(device)).float()
        labels = batch.labels.to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
    seconds = time.perf_counter() - start
    return {"accuracy": 100.0 * correct / seen, "loss": loss_sum / seen, "images_per_second": seen / seconds}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer's state into named tensors (safetensors) and JSON-able groups."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def _restore(
    out_dir: Path, resume: bool, meta: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[list[dict[str, Any]], int]:
    """Load the last finished epoch's state of the run in `out_dir` when resuming; returns the
    metrics history and the epoch to start from. Refuses to start over a run unasked."""
    state = out_dir / f"{STATE_FILE}.json"
    if not resume:
        if state.exists():
            raise LotusError(f"{out_dir} already holds a training run: pass --resume to continue it, or a new --out")
        return [], 0
    if not state.exists():
        return [], 0  # nothing finished yet: start from epoch 1
    tensors, saved = load_checkpoint(out_dir / STATE_FILE)
    if saved["run"] != json.loads(json.dumps(meta)):
        raise LotusError(f"{out_dir} holds a run with other settings: resume it with the same flags, or pass a new --out")
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer(opt, {k: v.to(device) for k, v in tensors.items()}, saved["param_groups"])
    console.print(f"resuming {out_dir} after epoch {saved['epoch']}")
    return saved["history"], saved["epoch"]


def batch_tokens(
    keep_fn: Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]] | None, batch: Batch, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch's keep indices and fused-token weights on `device` (None, None without tickets)."""
    if keep_fn is None:
        return None, None
    keep_idx, fuse = keep_fn(batch)
    return keep_idx.to(device), None if fuse is None else fuse.to(device)


def fit(
    model: TokenGatherViT,
    train_loader: BatchLoader,
    eval_loader: BatchLoader | None,
    cfg: TrainConfig,
    out_dir: Path | None,
    *,
    meta: dict[str, Any],
    resume: bool = False,
    keep_fn: Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    masks: Masks | None = None,
) -> list[dict[str, Any]]:
    """Train `model` for `cfg.epochs`, evaluating and checkpointing after every epoch.

    Args:
        eval_loader: evaluated after every epoch; None skips evaluation.
        out_dir: run folder for metrics.jsonl and the resumable state; None writes nothing
            (ISP's short-lived weak copies).
        meta: what identifies the run (configs, preprocessing); written into every checkpoint,
            and a resumed run must match it.
        resume: continue from `out_dir`'s last completed epoch instead of starting afresh.
        keep_fn: gives the (B, K) patch indices to train each batch on (data lottery tickets)
            and the (B, N) weights of a fused token or None (Tickets.tokens_for_batch); None
            trains on every patch.
        masks: pruning masks (True = kept) that hold through training: pruned weights get no
            gradient and are re-zeroed, with their optimizer state, after every step.
    Returns:
        One metrics dict per epoch (the contents of metrics.jsonl).
    """
    import timm.optim

    device = resolve_device(cfg.device)
    model.to(device)
    rank, world = distributed()
    train_model = model
    if world > 1:  # each process trains on its share of every batch; DDP averages the gradients
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    enforcer = enforce_masks_(model, masks) if masks else None
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    history, start_epoch = _restore(out_dir, resume, meta, model, opt, device) if out_dir is not None else ([], 0)
    if rank != 0:
        out_dir = None  # every process restores the run; one writes it
    if out_dir is not None:
        (out_dir / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    with make_progress() as progress:
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout / drop-path noise of this epoch
            model.train()
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, status="")
            loss_sum, correct, seen = 0.0, 0, 0
            start, start_cpu = time.perf_counter(), time.process_time()
            for i, batch in enumerate(train_loader.epoch(epoch)):
                if world > 1:
                    batch = Batch(*(None if t is None else t[rank::world] for t in batch))
                step = epoch * steps_per_epoch + i
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
                images, labels = batch.images.to(device), batch.labels.to(device)
                keep_idx, fuse = batch_tokens(keep_fn, batch, device)
                with autocast(device):
                    logits = train_model(images, keep_idx, fuse)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if enforcer is not None:
                    enforcer.after_step(opt)

                loss_sum += loss.item() * len(labels)
                correct += (logits.argmax(-1) == labels).sum().item()
                seen += len(labels)
                rate = seen / (time.perf_counter() - start)
                status = f"loss {loss_sum / seen:.3f} acc {100 * correct / seen:.1f}% {rate:.0f} img/s"
                progress.update(task, advance=1, status=status)
            train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            progress.remove_task(task)
            if world > 1:  # epoch figures over all processes
                totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
                torch.distributed.all_reduce(totals)
                loss_sum, correct, seen = totals[0].item(), int(totals[1]), int(totals[2])

            ev = evaluate(model, eval_loader, device) if eval_loader is not None else {"loss": None, "accuracy": None}
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_accuracy": 100.0 * correct / seen,
                "test_loss": ev["loss"],
                "test_accuracy": ev["accuracy"],
                "lr": opt.param_groups[0]["lr"],
                "epoch_seconds": train_seconds,
                "epoch_cpu_seconds": cpu_seconds,  # all threads of this process: robust to other load on the machine
                "images_per_second": seen / train_seconds,
            }
            history.append(record)
            if out_dir is None:
                continue
            print(json.dumps(record), flush=True)
            with (out_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            opt_tensors, groups = _optimizer_tensors(opt)
            model_tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            save_checkpoint(
                out_dir / STATE_FILE,
                {**model_tensors, **opt_tensors},
                {"run": meta, "epoch": epoch + 1, "history": history, "param_groups": groups},
            )
    if enforcer is not None:
        enforcer.remove()
    if world > 1:
        console.print(f"rank {rank}/{world} weights {weights_digest(model)}")
    return history


def default_configs(data_name: str) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """The configs `lotus train --data NAME` starts from before its flags apply.

    The digits are 8x8: upsampled to 16x16 with 4x4 patches (16 tokens, as on an 8x8 grid of
    2x2 patches but with smoother patch embeddings, which learn faster), and a 4-block ViT-Tiny
    trained with small batches: 1,437 training images give few steps per epoch.
    """
    if data_name == "digits":
        return (
            DataConfig("digits", img_size=16),
            ModelConfig(depth=4, drop_path_rate=0.0),
            TrainConfig(epochs=20, batch_size=32, lr=5e-4, warmup_epochs=1.0),
        )
    return DataConfig(data_name), ModelConfig(), TrainConfig()


def preprocess_of(data: ImageData, mean: list[float], std: list[float]) -> dict[str, Any]:
    """What a model's inputs went through, so evaluation and serving can repeat it."""
    return {
        "img_size": data.img_size,
        "resize": "bilinear, to img_size x img_size",
        "mean": mean,
        "std": std,
        "pixel_scale": "RGB in [0, 1] before normalisation",
        "classes": data.classes,
        "dataset": data.name,
    }


def train(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    init_checkpoint: str | Path | None = None,
    tickets: str | Path | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Train a ViT on a dataset into `out_dir` (metrics.jsonl, train_state, model checkpoint).

    Args:
        init_checkpoint: start from this LOTUS checkpoint's weights and preprocessing
            (its model config replaces `model_cfg`).
        tickets: a `lotus tickets` folder for this training split: each image is trained on its
            kept patches only (moved with the augmentation), so each step costs less.
    """
    torch.manual_seed(cfg.seed)
    masks = None
    if init_checkpoint is not None:
        model, init_meta = load_model(init_checkpoint)
        masks = init_meta["masks"] or None  # a pruned model stays pruned
        model_cfg = ModelConfig(**init_meta["model"])
        mean, std = init_meta["preprocess"]["mean"], init_meta["preprocess"]["std"]
        data_cfg = replace(data_cfg, img_size=model_cfg.img_size)
    train_data = load_split(data_cfg, "train")
    test_data = load_split(replace(data_cfg, img_size=train_data.img_size), "test")
    if init_checkpoint is None:
        model_cfg = replace(
            model_cfg,
            num_classes=len(train_data.classes),
            img_size=train_data.img_size,
            patch_size=model_cfg.patch_size or default_patch_size(train_data.img_size),
        )
        model = build_model(model_cfg)
        if model_cfg.pretrained:
            mean, std = list(model.pretrained_cfg["mean"]), list(model.pretrained_cfg["std"])
        else:
            mean, std = train_data.channel_stats()
    elif model_cfg.num_classes != len(train_data.classes):
        raise LotusError(
            f"checkpoint has {model_cfg.num_classes} classes but {data_cfg.name} has {len(train_data.classes)}: "
            "fine-tune from a checkpoint trained on the same classes"
        )
    preprocess = preprocess_of(train_data, mean, std)
    keep_fn, tickets_meta = None, None
    if tickets is not None:
        lottery = load_tickets(tickets)
        lottery.check(train_data, model_cfg.grid_size, model_cfg.patch_size or default_patch_size(model_cfg.img_size))
        keep_fn = lottery.tokens_for_batch
        tickets_meta = {
            "path": str(tickets),
            "drop": lottery.meta["config"]["drop"],
            "select": lottery.meta["config"]["select"],
            "temperature": lottery.temperature,
            "fuse": lottery.fuse,
            "num_keep": lottery.num_keep,
            "sha256": lottery.meta["sha256"],
        }
    train_loader = BatchLoader(
        train_data,
        cfg.batch_size,
        mean,
        std,
        shuffle=True,
        augment=default_augment(data_cfg.name),
        drop_last=len(train_data) >= 2 * cfg.batch_size,
        seed=cfg.seed,
    )
    eval_loader = BatchLoader(test_data, 256, mean, std)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "data": asdict(data_cfg),
        "model": asdict(model_cfg),
        "train": asdict(cfg),
        "preprocess": preprocess,
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "tickets": tickets_meta,
    }
    history = fit(model, train_loader, eval_loader, cfg, out_dir, meta=meta, resume=resume, keep_fn=keep_fn, masks=masks)
    rank, world = distributed()
    if rank == 0:  # one process writes the run folder; the others wait until it is there
        save_model(
            out_dir,
            model,
            model_cfg,
            preprocess,
            masks,
            data=asdict(data_cfg),
            train=asdict(cfg),
            tickets=tickets_meta,
            metrics=history[-1],
        )
    if world > 1:
        torch.distributed.barrier()
    return history


def evaluate_checkpoint(
    checkpoint: str | Path, data_cfg: DataConfig, batch_size: int = 256, device: str = "auto"
) -> dict[str, Any]:
    """Evaluate a LOTUS checkpoint on a dataset's test split, preprocessed as the checkpoint says."""
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    pre = meta["preprocess"]
    test_data = load_split_for_model(data_cfg, pre, "test")
    result = evaluate(model, BatchLoader(test_data, batch_size, pre["mean"], pre["std"]), dev)
    return {"checkpoint": str(checkpoint), "data": data_cfg.name, "images": len(test_data), **result}
