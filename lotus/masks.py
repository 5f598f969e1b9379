"""Pruning masks: magnitude masks, merges, the essential-sparsity knee, and masks that hold.

Masks are data: a dict from parameter name to a bool tensor of the parameter's shape, True
where the weight is kept. The maths are pure functions on tensors (`magnitude_masks`,
`merge_masks`, `essential_sparsity`); functions that change a model end in `_`
(`apply_masks_`, `enforce_masks_`).

Prunable by default: the Linear weights inside the transformer blocks (attention qkv and
projection, both MLP layers). Patch embedding, positional embeddings, class token, norms,
biases and the classifier head stay dense unless `include` names them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lotus.config import EXTRA_PRUNABLE
from lotus.config import nm_pattern as nm_pattern  # re-exported: the settings check needs it without torch
from lotus.errors import LotusError

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor, True = kept

BLOCK_LINEARS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def prunable_names(model: torch.nn.Module, include: Iterable[str] = ()) -> list[str]:
    """Names of the weights pruning may touch: the blocks' Linear weights, plus `include`
    ('patch_embed', 'head')."""
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.") and n.endswith(BLOCK_LINEARS)]
    for extra in include:
        if extra not in EXTRA_PRUNABLE:
            raise LotusError(f"cannot prune {extra!r}: choose from {', '.join(EXTRA_PRUNABLE)}")
        names.append(EXTRA_PRUNABLE[extra])
    return names


def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, *, scope: str = "global", keep: Masks | None = None
) -> Masks:
    """Keep the largest-magnitude weights so that exactly round(sparsity * n) are pruned.

    Args:
        weights: name -> weight tensor.
        sparsity: fraction of weights pruned, over all tensors ('global') or in each ('layer').
        scope: 'global' ranks all weights together; 'layer' prunes each tensor to `sparsity`.
        keep: current masks; weights they prune stay pruned (they rank below every kept weight).
    """
    if not 0 <= sparsity < 1:
        raise LotusError(f"sparsity {sparsity} is outside [0, 1)")
    if scope not in ("global", "layer"):
        raise LotusError(f"pruning scope {scope!r} is not 'global' or 'layer'")
    scores = {}
    for name, w in weights.items():
        s = w.detach().abs().float()
        if keep is not None:
            s = torch.where(keep[name].to(s.device), s, torch.full_like(s, -1.0))  # already pruned: lowest
        scores[name] = s
    if scope == "layer":
        return {name: _keep_top(s.flatten(), s.numel() - round(sparsity * s.numel())).view_as(s) for name, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    kept = _keep_top(flat, flat.numel() - round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = kept[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


def _keep_top(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Bool mask of exactly `num_keep` highest scores (ties broken by position)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if num_keep > 0:
        mask[scores.topk(num_keep, sorted=False).indices] = True
    return mask


def holds_pattern(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of `m` consecutive inputs of `weight` has at most `n` non-zeros."""
    return weight.shape[-1] % m == 0 and int((weight.reshape(-1, m) != 0).sum(1).max()) <= n


def semi_structured_masks(weights: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> Masks:
    """N:M masks (2:4 for NVIDIA sparse tensor cores): in every group of `m` consecutive weights
    along the input dimension, keep the `n` of largest magnitude."""
    out = {}
    for name, w in weights.items():
        if w.shape[-1] % m:
            raise LotusError(f"{name} has {w.shape[-1]} inputs, not a multiple of {m}: it cannot hold a {n}:{m} pattern")
        groups = w.detach().abs().reshape(-1, m)  # (groups, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        out[name] = keep.view_as(w)
    return out


def merge_masks(masks: list[Masks], how: str = "union", min_votes: int | None = None) -> Masks:
    """Merge proposals: 'union' keeps a weight any proposal keeps, 'intersection' one all keep,
    'vote' one at least `min_votes` keep."""
    if not masks:
        raise ValueError("no masks to merge")
    votes = {name: torch.stack([m[name] for m in masks]).sum(0) for name in masks[0]}
    need = {"union": 1, "intersection": len(masks), "vote": min_votes}.get(how)
    if how not in ("union", "intersection", "vote"):
        raise LotusError(f"--merge {how!r} is not one of: union, vote, intersection")
    if need is None or not 1 <= need <= len(masks):
        raise LotusError(f"--merge vote needs a vote threshold between 1 and {len(masks)}")
    return {name: v >= need for name, v in votes.items()}


def mask_sparsity(masks: Masks) -> float:
    """Fraction of pruned entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def essential_sparsity(sparsities: list[float], accuracies: list[float], dense_accuracy: float, tolerance: float = 1.0) -> float:
    """The knee of an accuracy-against-sparsity curve.

    The largest tested sparsity whose accuracy, and that of every smaller tested sparsity, is
    within `tolerance` points of the dense model (a noisy recovery after the first fall does not
    count). 0.0 when even the smallest sparsity falls out.
    """
    best = 0.0
    for s, acc in sorted(zip(sparsities, accuracies)):
        if acc < dense_accuracy - tolerance:
            break
        best = s
    return best


@torch.no_grad()
def apply_masks_(model: torch.nn.Module, masks: Masks) -> torch.nn.Module:
    """Zero the pruned weights of `model` in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise LotusError(f"mask for {name!r} does not fit this model: was it made for another architecture?")
        if params[name].shape != mask.shape:
            raise LotusError(f"mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(params[name].shape)}")
        params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return model


class MaskEnforcer:
    """Keeps pruned weights exactly zero through training.

    Gradients of pruned weights are zeroed as they are computed (so AdamW's moments never
    see them), and after every optimizer step the weights and their optimizer state are masked
    again (so weight decay, momentum or a restored state cannot revive them).
    """

    def __init__(self, model: torch.nn.Module, masks: Masks):
        params = dict(model.named_parameters())
        self.pairs = [(params[name], mask.to(params[name].device)) for name, mask in masks.items()]
        self.hooks = [p.register_hook(lambda g, m=m: g * m) for p, m in self.pairs]
        apply_masks_(model, masks)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        for p, m in self.pairs:
            p.mul_(m)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.mul_(m)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def enforce_masks_(model: torch.nn.Module, masks: Masks) -> MaskEnforcer:
    """Apply `masks` to `model` and keep them applied; call `.after_step(opt)` after each step."""
    return MaskEnforcer(model, masks)


def sparsity_report(model: torch.nn.Module, names: Iterable[str]) -> dict:
    """Measured zeros, per weight and overall (what the weights hold, not what was asked for)."""
    params = dict(model.named_parameters())
    layers, zeros, total = {}, 0, 0
    for name in names:
        w = params[name]
        z = int((w == 0).sum())
        layers[name] = {"zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
        zeros += z
        total += w.numel()
    return {"overall": zeros / max(total, 1), "zeros": zeros, "numel": total, "layers": layers}


def sparsity_summary(report: dict) -> dict:
    """The overall figures of a `sparsity_report`, without the per-layer ones (what checkpoints record)."""
    return {key: report[key] for key in ("overall", "zeros", "numel")}


def to_semi_structured_(model: torch.nn.Module, names: Iterable[str]) -> torch.nn.Module:
    """Swap the named Linear weights of a 2:4-pruned model for PyTorch's semi-structured sparse
    tensors, so its matrix products run on NVIDIA sparse tensor cores (Ampere and newer).

    The model must already be on a CUDA device in half precision (fp16 or bf16) and every named
    weight must hold the 2:4 pattern (two zeros in every group of four inputs); for inference.
    """
    from torch.sparse import to_sparse_semi_structured

    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name.rsplit(".", 1)[0]]
        w = linear.weight.detach()
        if w.device.type != "cuda":
            raise LotusError("2:4 sparse kernels need the model on an NVIDIA GPU (Ampere or newer): move it with .cuda() first")
        if not holds_pattern(w):
            raise LotusError(f"{name} does not hold the 2:4 pattern: prune it with --sparsity 2:4 first")
        linear.weight = torch.nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
    return model
