"""Training and evaluation: AdamW, warm-up + cosine schedule, label smoothing, resumable.

`train` is what `lotus train` runs: load data, build (or load) the model, `fit`, save.
`fit` is the loop itself, reading top to bottom: batch -> lr -> forward -> loss -> backward ->
step -> re-apply masks -> log. The order of batches, the augmentation and the dropout noise of
epoch `e` depend only on (seed, e), and the optimizer state is checkpointed at every epoch end,
so a run resumed after an interruption ends with exactly the weights of an uninterrupted one.

Nothing here draws: progress goes to an optional `Progress` callback (`lotus.progress`), messages
to a `log` callable (stderr by default), and stdout carries one JSON line per finished epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lotus.checkpoint import (
    atomic_write_text,
    finish_interrupted_save,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from lotus.config import DataConfig, ModelConfig, TrainConfig, check_holdout, default_patch_size, holdout
from lotus.config import default_configs as default_configs  # re-exported: the settings live in lotus.config
from lotus.data import (
    SPLIT_WORDS,
    Batch,
    ImageData,
    Loader,
    decoded_bytes,
    load_split,
    load_split_for_model,
    make_loader,
    resolve_augment,
)
from lotus.device import autocast, distributed, resolve_device, weights_digest
from lotus.drop import num_keep, select_block_of
from lotus.errors import LotusError
from lotus.images import resize_words
from lotus.masks import MaskEnforcer, Masks, enforce_masks_
from lotus.progress import Progress, log_to_stderr, report
from lotus.tickets import load_tickets
from lotus.vit import TokenGatherViT, build_model, pretrained_source

STATE_FILE = "train_state"  # resumable state in a run folder: model + optimizer + epoch
METRICS_FILE = "metrics.jsonl"  # one JSON line per epoch
NO_EVAL = {"loss": None, "accuracy": None}  # an epoch's test figures when nothing is evaluated

KeepFn = Callable[[Batch], tuple[torch.Tensor, torch.Tensor | None]]  # (B, K) keep indices, (B, N) fused-token weights or None


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate at optimizer step `step`: linear warm-up to `peak`, cosine decay to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """`cfg`'s learning rate as a function of the optimizer step."""
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    return lambda step: lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Loader, device: torch.device) -> dict[str, float]:
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
    out_dir: Path | None,
    resume: bool,
    meta: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], int]:
    """Load the last finished epoch's state of the run in `out_dir` when resuming; returns the
    metrics history and the epoch to start from. Refuses to start over a run unasked."""
    if out_dir is None:
        return [], 0  # a run that writes nothing (ISP's weak copies) has nothing to restore
    state = out_dir / f"{STATE_FILE}.json"
    if not resume:
        if state.exists():
            raise LotusError(f"{out_dir} already holds a training run: pass --resume to continue it, or a new --out")
        return [], 0
    if not state.exists():
        return [], 0  # nothing finished yet: start from epoch 1
    tensors, saved = load_checkpoint(out_dir / STATE_FILE)
    current = json.loads(json.dumps(meta))
    if _with_new_settings(saved["run"], current) != current:
        raise LotusError(f"{out_dir} holds a run with other settings: resume it with the same flags, or pass a new --out")
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer(opt, {k: v.to(device) for k, v in tensors.items()}, saved["param_groups"])
    log(f"resuming {out_dir} after epoch {saved['epoch']}")
    return saved["history"], saved["epoch"]


def _with_new_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A run's saved settings with those LOTUS has gained since the run started put in at their
    defaults (the run ran as the defaults do: a new setting's default is the old behaviour), so
    that upgrading LOTUS does not strand a run halfway; a new setting given another value still
    makes the run one with other settings."""
    defaults = {"data": asdict(DataConfig()), "train": asdict(TrainConfig()), "preprocess": {"crop_pct": None}}
    filled = dict(saved)
    for key, known in defaults.items():
        if isinstance(saved.get(key), dict) and isinstance(current.get(key), dict):
            added = {k: known[k] for k in current[key].keys() - saved[key].keys() if k in known}
            filled[key] = {**saved[key], **json.loads(json.dumps(added))}
    return filled


def _writer(out_dir: Path | None, rank: int, history: list[dict[str, Any]]) -> Path | None:
    """The run folder this process writes (rank 0 only), its metrics.jsonl started over from the
    restored `history` (an interrupted epoch may have left a line its state never reached) and
    the interrupted save of its state, if any, finished."""
    if out_dir is None or rank != 0:
        return None
    finish_interrupted_save(out_dir / STATE_FILE)
    _write_metrics(out_dir, history)
    return out_dir


def _write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl, one line per epoch of `history`; rewritten whole and atomically, so no
    failed write leaves a partial line."""
    atomic_write_text(out_dir / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))


def _save_epoch(
    out_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    """Report the epoch just finished (a JSON line on stdout and in metrics.jsonl) and save the
    state a resumed run starts from. A failed save leaves a whole state, this epoch's or the one
    before (metrics.jsonl may then be a line ahead: resuming rewrites it from the state's history)."""
    record = history[-1]
    print(json.dumps(record), flush=True)
    _write_metrics(out_dir, history)
    opt_tensors, groups = _optimizer_tensors(opt)
    model_tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(
        out_dir / STATE_FILE,
        {**model_tensors, **opt_tensors},
        {"run": meta, "epoch": record["epoch"], "history": history, "param_groups": groups},
    )


def _prepare(
    model: torch.nn.Module, cfg: TrainConfig, masks: Masks, device: torch.device, world: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, MaskEnforcer]:
    """Move `model` to `device`; returns the module to train, its AdamW optimizer and the
    enforcer of `masks` (pruned weights get no gradient). Under torchrun the module to train is
    DDP's wrapper: each process trains on its share of every batch and DDP averages the gradients.
    On CUDA it is compiled (`cfg.compile`): a small ViT's step is otherwise bound by kernel
    launches, and the tokens kept per image are fixed for a run, so shapes are static and it
    compiles once (once more for a short last batch)."""
    import timm.optim

    model.to(device)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update, not several per tensor
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return train_model, opt, enforce_masks_(model, masks)


@dataclass
class EpochTally:
    """An epoch's training figures so far: summed loss, correct predictions, images seen, time."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    start: float = field(default_factory=time.perf_counter)
    start_cpu: float = field(default_factory=time.process_time)
    seconds: float = 0.0  # wall time of the epoch's training, set by `stop`
    cpu_seconds: float = 0.0  # CPU time of all threads of this process: robust to other load on the machine

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.item() * len(labels)
        self.correct += (logits.argmax(-1) == labels).sum().item()
        self.seen += len(labels)

    def status(self) -> str:
        rate = self.seen / (time.perf_counter() - self.start)
        return f"loss {self.loss_sum / self.seen:.3f} acc {100 * self.correct / self.seen:.1f}% {rate:.0f} img/s"

    def stop(self, world: int) -> None:
        """Stop the clocks; with several processes, sum the figures over all of them."""
        self.seconds, self.cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.start_cpu
        if world > 1:
            totals = torch.tensor([self.loss_sum, self.correct, self.seen], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            self.loss_sum, self.correct, self.seen = totals[0].item(), int(totals[1]), int(totals[2])

    def record(self, epoch: int, test: dict[str, Any], lr: float) -> dict[str, Any]:
        """One line of metrics.jsonl."""
        return {
            "epoch": epoch + 1,
            "train_loss": self.loss_sum / self.seen,
            "train_accuracy": 100.0 * self.correct / self.seen,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "lr": lr,
            "epoch_seconds": self.seconds,
            "epoch_cpu_seconds": self.cpu_seconds,
            "images_per_second": self.seen / self.seconds,
        }


def batch_tokens(keep_fn: KeepFn | None, batch: Batch, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch's keep indices and fused-token weights on `device` (None, None without tickets)."""
    if keep_fn is None:
        return None, None
    keep_idx, fuse = keep_fn(batch)
    return keep_idx.to(device), None if fuse is None else fuse.to(device)


def fit(
    model: TokenGatherViT,
    train_loader: Loader,
    eval_loader: Loader | None,
    cfg: TrainConfig,
    out_dir: Path | None,
    *,
    meta: dict[str, Any],
    resume: bool = False,
    keep_fn: KeepFn | None = None,
    masks: Masks | None = None,
    teacher: torch.nn.Module | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = log_to_stderr,
) -> list[dict[str, Any]]:
    """Train `model` for `cfg.epochs`, evaluating and checkpointing every epoch; returns metrics.jsonl's lines.

    Args:
        eval_loader: evaluated after every epoch; None skips evaluation.
        out_dir: run folder for metrics.jsonl and the resumable state; None writes nothing.
        meta: what identifies the run, saved with its state; a resumed run must match it.
        keep_fn: a batch's kept patch indices and fused-token weights (data lottery tickets); None: every patch.
        masks: pruning masks (True = kept) that hold through training.
        teacher: a model whose predictions on each whole (augmented) image `model` also learns
            (`cfg.distill_weight`, `cfg.distill_temperature`); it sees every patch, whatever `model` keeps.
        progress: told ("epoch e/E", steps done, steps per epoch, status) after every step.
    """
    device = resolve_device(cfg.device)
    rank, world = distributed()
    train_model, opt, enforcer = _prepare(model, cfg, masks or {}, device, world)
    history, start_epoch = _restore(out_dir, resume, meta, model, opt, device, log)
    out_dir = _writer(out_dir, rank, history)  # every process restores the run; one writes it
    steps_per_epoch, lr_of, mix = len(train_loader), schedule(cfg, len(train_loader)), mixing(cfg, model.num_classes, rank)
    teach = teaching(teacher, cfg, device)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout / drop-path noise of this epoch
        model.train()
        tally = EpochTally()
        for i, batch in enumerate(train_loader.epoch(epoch, rank, world)):
            for group in opt.param_groups:
                group["lr"] = lr_of(epoch * steps_per_epoch + i)
            images, labels = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
            keep_idx, fuse = batch_tokens(keep_fn, batch, device)
            images, targets = mix(images, labels, epoch * steps_per_epoch + i)
            with autocast(device):
                logits = train_model(images, keep_idx, fuse, dropping(model, cfg, epoch * steps_per_epoch + i))
            loss = training_loss(logits.float(), targets, cfg, teach(images))
            optimizer_step(loss, model, opt, enforcer, cfg.grad_clip)
            tally.add(loss, logits, labels)
            report(progress, f"epoch {epoch + 1}/{cfg.epochs}", i + 1, steps_per_epoch, tally.status())
        tally.stop(world)
        test = evaluate(model, eval_loader, device) if eval_loader is not None else NO_EVAL
        history.append(tally.record(epoch, test, opt.param_groups[0]["lr"]) | {"skipped_images": train_loader.skipped})
        if out_dir is not None:
            _save_epoch(out_dir, model, opt, meta, history)
    enforcer.remove()
    if world > 1:
        log(f"rank {rank}/{world} weights {weights_digest(model)}")
    return history


def optimizer_step(
    loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, enforcer: MaskEnforcer, grad_clip: float
) -> None:
    """backward -> clip -> step -> re-apply masks."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    enforcer.after_step(opt)  # weight decay or momentum must not revive pruned weights


def teaching(
    teacher: torch.nn.Module | None, cfg: TrainConfig, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A step's images -> the teacher's logits on them (every patch, no gradient); None without a teacher."""
    if teacher is None:
        return lambda images: None
    teacher.to(device).eval().requires_grad_(False)
    run = torch.compile(teacher) if cfg.compile and device.type == "cuda" else teacher

    @torch.no_grad()
    def teach(images: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return run(images).float()

    return teach


def training_loss(
    logits: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, teacher_logits: torch.Tensor | None
) -> torch.Tensor:
    """Label-smoothed cross-entropy on `targets` (class indices or, mixed, probabilities); with a
    teacher's logits, blended with the KL divergence from the teacher's softened predictions,
    scaled by T^2 so its gradients keep their size whatever the temperature (Hinton et al. 2015)."""
    loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return loss
    t, w = cfg.distill_temperature, cfg.distill_weight
    taught = F.kl_div(
        F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean", log_target=True
    )
    return (1 - w) * loss + w * t * t * taught


def mixing(cfg: TrainConfig, num_classes: int, rank: int) -> Callable[[torch.Tensor, torch.Tensor, int], tuple]:
    """A step's (images, labels, step) -> (images, targets): timm's Mixup / CutMix mixing images
    and labels alike (targets as class probabilities) when `cfg` asks for them, else unchanged."""
    from timm.data import Mixup

    if not (cfg.mixup or cfg.cutmix):
        return lambda images, labels, step: (images, labels)
    # label smoothing stays with the loss, which smooths class probabilities as timm would
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=num_classes)

    def mix(images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2:  # timm pairs a batch with its reverse: an odd batch goes unmixed
            return images, labels
        state = np.random.get_state()
        np.random.seed([cfg.seed, step, rank])  # timm draws from numpy's global generator: a resumed run mixes alike
        try:
            return mixup(images.clone(), labels)  # timm mixes in place; the batch may be the data's own tensor
        finally:
            np.random.set_state(state)

    return mix


def dropping(model: TokenGatherViT, cfg: TrainConfig, step: int) -> tuple[int, int] | None:
    """Drop-aware training's (num_keep, select_block) at `step`: the drop ratios taken in turn;
    None trains on every patch (or on the tickets)."""
    if not cfg.drop_aware:
        return None
    drop = cfg.drop_aware[step % len(cfg.drop_aware)]
    return num_keep(model.patch_embed.num_patches, drop), select_block_of(len(model.blocks), cfg.select_block)


def preprocess_of(data: ImageData, mean: list[float], std: list[float], crop_pct: float | None = None) -> dict[str, Any]:
    """What a model's inputs went through, so evaluation and serving can repeat it."""
    return {
        "img_size": data.img_size,
        "crop_pct": crop_pct,  # evaluation's and serving's centre crop (None: the whole image)
        "resize": resize_words(data.img_size, crop_pct),
        "mean": mean,
        "std": std,
        "pixel_scale": "RGB in [0, 1] before normalisation",
        "classes": data.classes,  # the identity data is checked against (ImageFolder: the folder names)
        "labels": data.class_labels,  # what people see for each class (classes.tsv's words, else the classes)
        "dataset": data.name,
    }


class _Start(NamedTuple):
    """What training starts from: the model, its config and preprocessing, the data, the masks."""

    model: TokenGatherViT
    model_cfg: ModelConfig
    data_cfg: DataConfig
    train_data: ImageData
    test_data: ImageData
    preprocess: dict[str, Any]
    masks: Masks | None  # a pruned model's masks, which hold through training
    pretrained: dict[str, Any] | None  # where the starting weights came from (`lotus.vit.pretrained_source`)


def _load_splits(data_cfg: DataConfig) -> tuple[ImageData, ImageData]:
    train_data = load_split(data_cfg, "train")
    return train_data, load_split(replace(data_cfg, img_size=train_data.img_size), "test")


def _new_model(data_cfg: DataConfig, model_cfg: ModelConfig) -> _Start:
    """A freshly built model sized for the data; normalised with the pretrained weights' mean and
    std (a weight file: those timm gives the architecture's hub weights), or else the training split's."""
    train_data, test_data = _load_splits(data_cfg)
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
    preprocess = preprocess_of(train_data, mean, std, data_cfg.crop_pct)
    return _Start(model, model_cfg, data_cfg, train_data, test_data, preprocess, None, pretrained_source(model_cfg, model))


def _model_from_checkpoint(checkpoint: str | Path, data_cfg: DataConfig) -> _Start:
    """A LOTUS checkpoint's model, its masks, and the data at its input size, normalised as it was
    and cut as it was evaluated (unless `data_cfg` sets another crop_pct). Refused when the
    checkpoint was trained with another validation hold-out than `data_cfg`'s."""
    model, meta = load_model(checkpoint)
    check_holdout(meta, data_cfg, checkpoint)
    model_cfg = ModelConfig(**meta["model"])
    crop_pct = data_cfg.crop_pct if data_cfg.crop_pct is not None else meta["preprocess"].get("crop_pct")
    data_cfg = replace(data_cfg, img_size=model_cfg.img_size, crop_pct=crop_pct)
    train_data, test_data = _load_splits(data_cfg)
    if model_cfg.num_classes != len(train_data.classes):
        raise LotusError(
            f"checkpoint has {model_cfg.num_classes} classes but {data_cfg.name} has {len(train_data.classes)}: "
            "fine-tune from a checkpoint trained on the same classes"
        )
    preprocess = preprocess_of(train_data, meta["preprocess"]["mean"], meta["preprocess"]["std"], crop_pct)
    return _Start(model, model_cfg, data_cfg, train_data, test_data, preprocess, meta["masks"] or None, meta.get("pretrained"))


def _ticket_tokens(tickets: str | Path | None, start: _Start) -> tuple[KeepFn | None, dict[str, Any] | None]:
    """The keep function of a `lotus tickets` folder, checked against the training split and the
    model's patch grid, and what the run records about the tickets (None, None without)."""
    if tickets is None:
        return None, None
    lottery = load_tickets(tickets)
    cfg = start.model_cfg
    lottery.check(start.train_data, cfg.grid_size, cfg.patch_size or default_patch_size(cfg.img_size))
    return lottery.tokens_for_batch, {
        "path": str(tickets),
        "drop": lottery.meta["config"]["drop"],
        "select": lottery.meta["config"]["select"],
        "temperature": lottery.temperature,
        "fuse": lottery.fuse,
        "num_keep": lottery.num_keep,
        "sha256": lottery.meta["sha256"],
    }


def _teacher(checkpoint: str | None, start: _Start) -> TokenGatherViT | None:
    """The distillation teacher of `cfg.distill`, refused unless it predicts the same classes from
    the same input (size and normalisation) as the model it teaches."""
    if checkpoint is None:
        return None
    teacher, meta = load_model(checkpoint)
    mine, its = start.preprocess, meta["preprocess"]
    if its["classes"] != mine["classes"]:
        raise LotusError(
            f"--distill {checkpoint} predicts other classes than {start.data_cfg.name}: distill from a model trained on the same classes"
        )
    if its["img_size"] != mine["img_size"] or not np.allclose(its["mean"] + its["std"], mine["mean"] + mine["std"]):
        raise LotusError(
            f"--distill {checkpoint} reads its input otherwise ({its['img_size']} px, mean {its['mean']}, std {its['std']}) "
            f"than the model it would teach ({mine['img_size']} px, mean {mine['mean']}, std {mine['std']}): "
            "distill from the model this one was fine-tuned from, or one trained on the same preprocessing"
        )
    return teacher


def _loaders(start: _Start, cfg: TrainConfig, tickets: bool, log: Callable[[str], None]) -> tuple[Loader, Loader]:
    """Shuffled, augmented training batches (the last partial one dropped unless the split is
    small) and evaluation batches; says where the images come from and how they are augmented."""
    mean, std = start.preprocess["mean"], start.preprocess["std"]
    data, workers = start.train_data, start.data_cfg.workers
    augment = resolve_augment(cfg.augment, data)
    pin = resolve_device(cfg.device).type == "cuda"
    train_loader = make_loader(
        data,
        cfg.batch_size,
        mean,
        std,
        augment=augment,
        shuffle=True,
        drop_last=len(data) >= 2 * cfg.batch_size,
        seed=cfg.seed,
        workers=workers,
        geometric=not tickets,
        pin_memory=pin,
    )
    size = decoded_bytes(len(data), data.img_size)
    size_text = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    held = "streamed from its files" if data.streamed else "held in memory"
    by = f" by {train_loader.workers} loader workers" if train_loader.workers else ""
    log(
        f"training data: {len(data):,} images at {data.img_size} px ({size_text} decoded), {held}{by}; "
        f"augmentation {augment}{' without geometric RandAugment ops (tickets follow crops and flips)' if tickets and augment == 'randaug' else ''}"
    )
    return train_loader, make_loader(start.test_data, 256, mean, std, workers=workers, pin_memory=pin)


def _save_trained(out_dir: Path, start: _Start, meta: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Save the trained model into its run folder: one process writes it, the others wait until it is there."""
    rank, world = distributed()
    if rank == 0:
        save_model(
            out_dir,
            start.model,
            start.model_cfg,
            start.preprocess,
            start.masks,
            data=meta["data"],
            holdout=meta["holdout"],
            train=meta["train"],
            tickets=meta["tickets"],
            pretrained=meta["pretrained"],
            metrics=history[-1],
        )
    if world > 1:
        torch.distributed.barrier()


def train(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    init_checkpoint: str | Path | None = None,
    tickets: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = log_to_stderr,
) -> list[dict[str, Any]]:
    """Train a ViT on a dataset into `out_dir` (metrics.jsonl, train_state, model checkpoint).

    Args:
        init_checkpoint: start from this LOTUS checkpoint's weights, masks and preprocessing
            (its model config replaces `model_cfg`).
        tickets: a `lotus tickets` folder for this training split: each image is trained on its
            kept patches only (moved with the augmentation), so each step costs less.
        progress, log: passed to `fit`.
    """
    torch.manual_seed(cfg.seed)
    start = _new_model(data_cfg, model_cfg) if init_checkpoint is None else _model_from_checkpoint(init_checkpoint, data_cfg)
    if tickets is not None and cfg.drop_aware:
        raise LotusError("--drop-aware and --tickets both choose the patches a step trains on: pass one of them")
    if cfg.drop_aware:
        select_block_of(len(start.model.blocks), cfg.select_block)  # refused now, not at the first step
    keep_fn, tickets_meta = _ticket_tokens(tickets, start)
    teacher = _teacher(cfg.distill, start)
    train_loader, eval_loader = _loaders(start, cfg, keep_fn is not None, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "data": {k: v for k, v in asdict(start.data_cfg).items() if k != "workers"},  # how many: not what
        "holdout": holdout(start.data_cfg),  # the validation images this training never sees
        "model": asdict(start.model_cfg),
        "train": asdict(cfg),
        "preprocess": start.preprocess,
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "pretrained": start.pretrained,  # the weights training started from (or its init_checkpoint's started from)
        "tickets": tickets_meta,
    }
    history = fit(
        start.model,
        train_loader,
        eval_loader,
        cfg,
        out_dir,
        meta=meta,
        resume=resume,
        keep_fn=keep_fn,
        masks=start.masks,
        teacher=teacher,
        progress=progress,
        log=log,
    )
    _save_trained(out_dir, start, meta, history)
    return history


def evaluate_checkpoint(
    checkpoint: str | Path, data_cfg: DataConfig, batch_size: int = 256, device: str = "auto", split: str = "test"
) -> dict[str, Any]:
    """Evaluate a LOTUS checkpoint on a dataset's test (or 'val') split, preprocessed as the checkpoint says.

    Raises:
        LotusError: for 'val', the checkpoint was trained with another validation hold-out.
    """
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    if split == "val":
        check_holdout(meta, data_cfg, checkpoint)
    pre = meta["preprocess"]
    data = load_split_for_model(data_cfg, pre, split)
    result = evaluate(model, make_loader(data, batch_size, pre["mean"], pre["std"], workers=data_cfg.workers), dev)
    return {"checkpoint": str(checkpoint), "data": data_cfg.name, "split": SPLIT_WORDS[split], "images": len(data), **result}
