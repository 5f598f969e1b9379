"""ISSP pruning stages: the essential-sparsity sweep, one-shot pruning, Instant Soup Pruning.

Stage 1 prunes one-shot by global weight magnitude at the essential sparsity, the knee of the
accuracy-against-sparsity curve (`sweep`). Stage 2, Instant Soup Pruning (Jaiswal et al.,
ICML 2023), goes further in rounds: several weak copies start from the current masked weights,
each trains briefly on its own random slice (~10%) of the training data with its own seed, and
each proposes a magnitude mask pruning a further step of the remaining weights; the proposals
are merged (by default a weight stays if any copy keeps it), the copies' weights are averaged
(the soup), and the next round starts from there until the target sparsity.

Why the proposals come from copies trained on different data slices with different seeds, not
from one set of weights at several sparsity levels: magnitude masks of one tensor are nested, so
the union of such masks is just the least sparse of them and denoises nothing. Every round's
merged mask is then cut to exactly the round's sparsity (`exact_sparsity`), and fine-tuning keeps
the masks. The levels variant stays available for comparison (`merge="levels"`) and reports the
sparsity it actually reaches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lotus.checkpoint import atomic_write_csv, atomic_write_json, load_model, save_model
from lotus.config import DEFAULT_SPARSITIES as DEFAULT_SPARSITIES  # re-exported: the settings live in lotus.config
from lotus.config import WIDE_SPARSITIES as WIDE_SPARSITIES
from lotus.config import (
    DataConfig,
    ISPConfig,
    ModelConfig,
    PruneConfig,
    StructuredConfig,
    SweepConfig,
    TrainConfig,
    check_holdout,
    holdout,
    needs_validation,
)
from lotus.data import (
    SPLIT_WORDS,
    ImageData,
    Loader,
    load_split_for_model,
    make_loader,
    resolve_augment,
)
from lotus.device import resolve_device
from lotus.errors import LotusError
from lotus.masks import (
    Masks,
    apply_masks_,
    essential_sparsity,
    magnitude_masks,
    mask_sparsity,
    merge_masks,
    nm_pattern,
    prunable_names,
    semi_structured_masks,
    sparsity_report,
    sparsity_summary,
)
from lotus.progress import Progress, report
from lotus.structured import activation_scores, choose, group_scores, shrink_
from lotus.train import evaluate, fit
from lotus.vit import count_parameters, structure_of


def _weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}


def eval_loader(checkpoint_meta: dict, data_cfg: DataConfig, split: str, batch_size: int = 256) -> Loader:
    """Batches of the `split` ('val' or 'test') images, preprocessed as the checkpoint says."""
    pre = checkpoint_meta["preprocess"]
    data = load_split_for_model(data_cfg, pre, split)
    return make_loader(data, batch_size, pre["mean"], pre["std"], workers=data_cfg.workers)


def _sweep_rows(
    model: torch.nn.Module,
    keep: Masks | None,
    loader: Loader,
    cfg: SweepConfig,
    dev: torch.device,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """One row per sparsity of `cfg`: the model pruned one-shot (on top of `keep`), evaluated on
    `loader` (the validation split); the model is restored after each."""
    names = prunable_names(model, cfg.prune.include)
    original = copy.deepcopy(model.state_dict())
    rows = []
    report(progress, "sweeping", 0, len(cfg.sparsities))
    for i, s in enumerate(sorted(cfg.sparsities)):
        apply_masks_(model, magnitude_masks(_weights(model, names), s, scope=cfg.prune.scope, keep=keep))
        result = evaluate(model, loader, dev)
        measured = sparsity_report(model, names)["overall"]
        accuracy, loss, split = result["accuracy"], result["loss"], SPLIT_WORDS["val"]
        rows.append({"sparsity": s, "measured_sparsity": measured, "accuracy": accuracy, "loss": loss, "split": split})
        model.load_state_dict(original)
        report(progress, "sweeping", i + 1, len(cfg.sparsities))
    return rows


def sweep(
    checkpoint: str | Path,
    data_cfg: DataConfig,
    cfg: SweepConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One-shot global magnitude pruning at each sparsity, evaluated on the validation split; finds
    the essential sparsity. The test split is never read: the knee is a choice.

    Writes `sweep.csv`, `sweep.json` and `sweep.png` (accuracy against sparsity, knee marked).
    Sparsities are of the prunable weights (and add to any pruning the checkpoint already has).

    Args:
        progress: told ("sweeping", sparsities done, sparsities) as the sweep runs.

    Raises:
        LotusError: `data_cfg` has no validation split, or the checkpoint trained with another hold-out.
    """
    needs_validation(data_cfg, "the sweep")
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    check_holdout(meta, data_cfg, checkpoint)
    loader = eval_loader(meta, data_cfg, "val")
    dense = evaluate(model, loader, dev)
    rows = _sweep_rows(model, meta["masks"] or None, loader, cfg, dev, progress)
    knee = essential_sparsity([r["sparsity"] for r in rows], [r["accuracy"] for r in rows], dense["accuracy"], cfg.tolerance)
    summary = {
        "checkpoint": str(checkpoint),
        "dense_accuracy": dense["accuracy"],
        "split": SPLIT_WORDS["val"],  # of every accuracy here
        "images": len(loader.data),
        "tolerance": cfg.tolerance,
        "essential_sparsity": knee,
        "scope": cfg.prune.scope,
        "rows": rows,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out_dir / "sweep.csv", rows)
    atomic_write_json(out_dir / "sweep.json", summary)
    from lotus.plots import save_sweep_figure

    save_sweep_figure(out_dir / "sweep.png", rows, dense["accuracy"], knee, cfg.tolerance, SPLIT_WORDS["val"])
    return summary


def prune_oneshot(
    checkpoint: str | Path,
    sparsity: float | str,
    out_dir: str | Path,
    cfg: PruneConfig | None = None,
    *,
    data_cfg: DataConfig | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Stage 1: prune by magnitude to `sparsity` in one shot; saves the masked model (and, with
    `data_cfg`, its test accuracy, a report) to `out_dir`. Returns the sparsity report.

    `sparsity` may be an N:M pattern such as '2:4': in every group of M consecutive inputs of
    each weight, the N of largest magnitude stay (the layout NVIDIA sparse tensor cores run).
    `cfg` None prunes as PruneConfig() does.
    """
    cfg = cfg or PruneConfig()
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    names = prunable_names(model, cfg.include)
    keep = meta["masks"] or None
    if pattern := nm_pattern(sparsity):
        masks = semi_structured_masks(_weights(model, names), *pattern)
        if keep is not None:  # weights pruned before stay pruned
            masks = {name: m & keep[name].to(m.device) for name, m in masks.items()}
    else:
        masks = magnitude_masks(_weights(model, names), sparsity, scope=cfg.scope, keep=keep)
    apply_masks_(model, masks)
    measured = sparsity_report(model, names)
    accuracy = evaluate(model, eval_loader(meta, data_cfg, "test"), dev)["accuracy"] if data_cfg else None
    pruning = {"stage": "oneshot", "requested_sparsity": sparsity, "prune": asdict(cfg)}
    out_dir = save_pruned(out_dir, model, meta, masks, accuracy, "test", pruning=pruning, sparsity=sparsity_summary(measured))
    atomic_write_json(out_dir / "sparsity.json", measured)
    return {"sparsity": measured, "accuracy": accuracy}


def save_pruned(
    out_dir: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    masks: Masks | None,
    accuracy: float | None,
    split: str,
    **figures: Any,
) -> Path:
    """Save a pruned model into `out_dir` with `figures` (how it was pruned, its sparsity...), its
    accuracy on `split` ('val' or 'test'), and what it keeps of its parent checkpoint: the parent's
    hash, data, validation hold-out, training and tickets. Returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inherited = {k: meta[k] for k in ("data", "holdout", "train", "tickets", "pretrained") if k in meta}
    save_model(
        out_dir,
        model,
        ModelConfig(**meta["model"]),
        meta["preprocess"],
        masks,
        **figures,
        accuracy=accuracy,
        accuracy_split=SPLIT_WORDS[split] if accuracy is not None else None,
        parent=meta.get("sha256"),
        **inherited,
    )
    return out_dir


def isp(
    checkpoint: str | Path,
    data_cfg: DataConfig,
    cfg: ISPConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Stage 2: Instant Soup Pruning from a (stage-1) checkpoint to `cfg.target` sparsity.

    The weak copies train on the training split (the validation images held out of it); each
    round is evaluated on the validation split (None without one). The test split is never read.

    Returns a summary with the sparsity and validation accuracy after each round.

    Raises:
        LotusError: the checkpoint was trained with another validation hold-out than `data_cfg`'s.
    """
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    check_holdout(meta, data_cfg, checkpoint)
    pre = meta["preprocess"]
    names = prunable_names(model, cfg.prune.include)
    masks: Masks = meta["masks"] or {n: torch.ones_like(w, dtype=torch.bool) for n, w in _weights(model, names).items()}
    if set(masks) != set(names):
        raise LotusError("the checkpoint's masks cover other weights than this pruning: use the same --include")
    val_loader = eval_loader(meta, data_cfg, "val") if holdout(data_cfg)["source"] else None
    start = mask_sparsity(masks)
    if not start <= cfg.target < 1:
        raise LotusError(f"ISP target {cfg.target} must lie in [{start:.3f}, 1): the checkpoint is already {start:.3f} sparse")
    rounds = []
    if cfg.merge == "levels":
        levels = [start + (cfg.target - start) * (r + 1) / cfg.rounds for r in range(cfg.rounds)]
        proposals = [magnitude_masks(_weights(model, names), s, scope=cfg.prune.scope, keep=masks) for s in levels]
        masks = merge_masks(proposals, "union")
        apply_masks_(model, masks)
        rounds.append(_round_record(0, levels[-1], model, names, val_loader, dev, log))
    else:
        train_data = load_split_for_model(data_cfg, pre, "train")
        for r in range(cfg.rounds):
            level = start + (cfg.target - start) * (r + 1) / cfg.rounds
            copies = [_weak_copy(model, masks, train_data, pre, cfg, r, c, dev) for c in range(cfg.copies)]
            proposals = [magnitude_masks(_weights(c, names), level, scope=cfg.prune.scope, keep=masks) for c in copies]
            merged = merge_masks(proposals, cfg.merge, cfg.min_votes)
            masks = exact_sparsity(merged, proposals, [_weights(c, names) for c in copies], level)
            if cfg.soup:
                soup_(model, copies)
            apply_masks_(model, masks)
            rounds.append(_round_record(r + 1, level, model, names, val_loader, dev, log))
    measured = sparsity_report(model, names)
    pruning = {"stage": "isp", "isp": asdict(cfg), "rounds": rounds}
    out_dir = save_pruned(
        out_dir, model, meta, masks, rounds[-1]["accuracy"], "val", pruning=pruning, sparsity=sparsity_summary(measured)
    )
    atomic_write_json(out_dir / "sparsity.json", measured)
    return {"target": cfg.target, "achieved_sparsity": measured["overall"], "split": SPLIT_WORDS["val"], "rounds": rounds}


def _round_record(r: int, level: float, model, names, loader: Loader | None, dev, log) -> dict[str, Any]:
    """A round's sparsity and its accuracy on `loader` (the validation split; None without one)."""
    measured = sparsity_report(model, names)["overall"]
    accuracy = evaluate(model, loader, dev)["accuracy"] if loader is not None else None
    shown = f"validation accuracy {accuracy:.2f}%" if accuracy is not None else "no validation split"
    log(f"ISP round {r}: asked {level:.3f}, measured sparsity {measured:.3f}, {shown}")
    return {"round": r, "requested_sparsity": level, "measured_sparsity": measured, "accuracy": accuracy}


def _weak_copy(model, masks: Masks, data: ImageData, pre: dict, cfg: ISPConfig, round_: int, copy_: int, dev) -> torch.nn.Module:
    """A copy of the masked model trained briefly on its own random slice of the data."""
    seed = cfg.seed * 1_000_003 + round_ * 1009 + copy_
    gen = torch.Generator().manual_seed(seed)
    size = max(1, round(cfg.data_fraction * len(data)))
    index = torch.randperm(len(data), generator=gen)[:size]
    subset = data.subset(index)
    augment = resolve_augment("auto", subset)
    loader = make_loader(subset, 64, pre["mean"], pre["std"], augment=augment, shuffle=True, drop_last=size >= 128, seed=seed)
    weak = copy.deepcopy(model)
    train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, min_lr=cfg.lr, warmup_epochs=0.1, seed=seed, device=str(dev))
    torch.manual_seed(seed)
    fit(weak, loader, None, train_cfg, None, meta={}, masks=masks)
    return weak.eval()


def exact_sparsity(merged: Masks, proposals: list[Masks], weights: list[dict[str, torch.Tensor]], sparsity: float) -> Masks:
    """Cut or grow a merged mask to exactly `sparsity` overall.

    Ranks each weight by (kept by the merge, number of proposals keeping it, mean magnitude over
    the copies) and keeps the top; so the merge rule decides first, votes and magnitudes settle
    the rest.
    """
    n = len(proposals)
    scores = {}
    for name, m in merged.items():
        votes = torch.stack([p[name] for p in proposals]).float().sum(0)
        mag = torch.stack([w[name].abs().float() for w in weights]).mean(0)
        mag = mag / (mag.max() + 1e-12)  # in [0, 1]: below one vote
        scores[name] = m.float() * (n + 2) + votes + mag * 0.999
    return magnitude_masks(scores, sparsity, scope="global")


@torch.no_grad()
def soup_(model: torch.nn.Module, copies: list[torch.nn.Module]) -> torch.nn.Module:
    """Set `model`'s parameters to the average of the copies' (the "instant soup")."""
    states = [dict(c.named_parameters()) for c in copies]
    for name, p in model.named_parameters():
        p.copy_(torch.stack([s[name] for s in states]).mean(0))
    return model


def prune_structured(
    checkpoint: str | Path,
    out_dir: str | Path,
    cfg: StructuredConfig | None = None,
    *,
    data_cfg: DataConfig | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Remove `cfg.heads` of the attention heads and `cfg.mlp` of the MLP neurons, shrinking the
    model; saves it (and, with `data_cfg`, its test accuracy, a report) to `out_dir`.

    Unstructured masks the checkpoint carries are cut to the new shapes and still hold.

    Args:
        cfg: what to remove and how to rank it; None removes nothing (StructuredConfig()).
    """
    cfg = cfg or StructuredConfig()
    cfg.check()
    if cfg.importance != "magnitude" and data_cfg is None:
        raise LotusError(f"{cfg.importance} importance needs calibration images: pass --data, or use --importance magnitude")
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    params_before = count_parameters(model)
    head_scores, neuron_scores = unit_scores(model, cfg, data_cfg, meta["preprocess"], dev)
    keep = choose(head_scores, neuron_scores, cfg)
    masks = shrink_(model, keep, meta["masks"] or None)
    accuracy = evaluate(model, eval_loader(meta, data_cfg, "test"), dev)["accuracy"] if data_cfg else None
    params_after = count_parameters(model)
    result = {
        "config": asdict(cfg),
        "structure": structure_of(model),
        "keep": keep,
        "accuracy": accuracy,
        "parameters": {"before": params_before, "after": params_after, "ratio": params_after / params_before},
    }
    figures = {"pruning": {"stage": "structured", **asdict(cfg)}, "parameters": result["parameters"]}
    if masks:
        figures["sparsity"] = sparsity_summary(sparsity_report(model, list(masks)))
    out_dir = save_pruned(out_dir, model, meta, masks, accuracy, "test", **figures)
    atomic_write_json(out_dir / "structured.json", result)
    return result


def calibration_batches(
    data_cfg: DataConfig, pre: dict[str, Any], cfg: StructuredConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of the `cfg.calib_images` training images drawn with `cfg.seed`
    that data-driven structured importance is measured on."""
    train_data = load_split_for_model(data_cfg, pre, "train")
    index = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.calib_images]
    calib = train_data.take(index)
    return ((b.images, b.labels) for b in make_loader(calib, 64, pre["mean"], pre["std"]).epoch())


def unit_scores(
    model: torch.nn.Module, cfg: StructuredConfig, data_cfg: DataConfig | None, pre: dict[str, Any], dev: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block, the head and the MLP neuron scores `cfg.importance` ranks by; 'activation' and
    'taylor' measure them on `cfg.calib_images` training images drawn with `cfg.seed`."""
    if cfg.importance == "magnitude":
        return group_scores(model, "magnitude", [], dev)
    batches = calibration_batches(data_cfg, pre, cfg)
    if cfg.importance == "activation":
        return activation_scores(model, batches, dev)
    return group_scores(model, "taylor", batches, dev)
