"""Structured pruning: whole attention heads and MLP neurons removed, the model physically shrunk.

Unstructured sparsity leaves every matmul its dense shape, so CPUs run it no faster. Removing
a head takes its rows out of `attn.qkv` and its columns out of `attn.proj`; removing an MLP
neuron takes its row out of `mlp.fc1` and its column out of `mlp.fc2`. The shrunk model is a
plain timm ViT with narrower blocks (`attn.num_heads`, `attn.attn_dim` and the Linear shapes
change; the head size and the embedding width do not), so training, tickets, export and
serving run on it unchanged.

Importance scores (`importance`):
- 'magnitude' (default): weight norms alone, no data: the L2 norm of every weight and bias the
  unit owns (Torch-Pruning's GroupMagnitudeImportance, see `group_scores`).
- 'activation': what removing the unit would take out of the residual stream, measured on
  calibration images: a head's mean ||o_h W_proj[:, h]|| over tokens, a neuron's mean
  |a_j| * ||W_fc2[:, j]||.
- 'taylor': the first-order Taylor estimate of the loss change when the unit is removed
  (Molchanov et al., CVPR 2019): |w * dL/dw| summed over the unit's weights, the gradients
  summed over calibration batches (Torch-Pruning's GroupTaylorImportance).
Torch-Pruning's scores chose better than the products of norms and the squared Taylor sums this
module computed by hand before (benchmarks/structured_peers.py); the surgery stays here, because
it also cuts a checkpoint's unstructured masks and records each block's widths.

Ranking (`scope`): 'block' (default) removes the same share of every block, so the model stays
regular; 'global' ranks the units of all blocks together, so blocks lose different numbers of
heads and neurons (each keeps at least one of each).

The per-block widths a shrunk model is saved with, and how a fresh model is given them again
(`structure_of`, `reshape_`), live in `lotus.vit`, where models are built.

`structure_masks` expresses the same choice as zero masks on the dense model (a removed head
or neuron contributes exactly nothing when its `attn.proj` / `mlp.fc2` columns are zero), which
is what the shrunk model is checked against.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.layers.attention import Attention

from lotus.config import IMPORTANCE as IMPORTANCE  # re-exported: the settings live in lotus.config
from lotus.config import StructuredConfig
from lotus.errors import LotusError
from lotus.masks import Masks
from lotus.vit import check_resizable, resize_block_

Keep = dict[str, list[list[int]]]  # {"heads": per block kept head indices, "mlp": per block kept neurons}


def _num_removed(fraction: float, count: int, what: str) -> int:
    removed = round(fraction * count)
    if removed >= count:
        raise LotusError(f"removing {fraction:g} of the {what} would leave a block none of its {count}: use a smaller fraction")
    return removed


def _head_rows(attn: Attention, heads: list[int]) -> torch.Tensor:
    """Indices of `heads`' rows in the qkv projection (laid out as q heads, k heads, v heads)."""
    hd, dim = attn.head_dim, attn.attn_dim
    return torch.tensor([s * dim + h * hd + j for s in range(3) for h in heads for j in range(hd)])


def _head_cols(attn: Attention, heads: list[int]) -> torch.Tensor:
    hd = attn.head_dim
    return torch.tensor([h * hd + j for h in heads for j in range(hd)])


def group_scores(
    model: torch.nn.Module, importance: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: (num_heads,) head and (hidden,) neuron scores by Torch-Pruning's group importance.

    Torch-Pruning traces the model and finds, for a head, every weight and bias that belongs to it
    (its q, k and v rows of `attn.qkv`, its columns of `attn.proj`) and, for a neuron, its row
    and bias in `mlp.fc1` and its column of `mlp.fc2`. 'magnitude' scores them by their L2 norm,
    'taylor' by |w * dL/dw| summed over them, the gradients summed over `batches`; a head's score
    is the mean over its channels, as Torch-Pruning's own MetaPruner ranks heads, and each
    group's scores are divided by their mean, so blocks compare in a global ranking.
    """
    import torch_pruning as tp

    model.eval()  # no dropout or drop-path noise in the gradients
    example = torch.randn(1, 3, *model.patch_embed.img_size, device=device)
    unwrapped = [(p, p.dim() - 1) for p in model.parameters(recurse=False)]  # class token, position embedding
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, unwrapped_parameters=unwrapped)
    scorer = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    heads, neurons = [], []
    try:
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
            for x, y in batches:
                torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        for blk in model.blocks:
            attn, fc1 = blk.attn, blk.mlp.fc1
            group = graph.get_pruning_group(attn.proj, tp.prune_linear_in_channels, idxs=list(range(attn.proj.in_features)))
            heads.append(scorer(group).reshape(attn.num_heads, attn.head_dim).mean(1).cpu())
            group = graph.get_pruning_group(fc1, tp.prune_linear_out_channels, idxs=list(range(fc1.out_features)))
            neurons.append(scorer(group).cpu())
    finally:
        model.zero_grad(set_to_none=True)
    return heads, neurons


@torch.inference_mode()
def activation_scores(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: each head's and each neuron's mean contribution to the residual stream."""
    blocks = list(model.blocks)
    heads = [torch.zeros(b.attn.num_heads, device=device) for b in blocks]
    neurons = [torch.zeros(b.mlp.fc2.in_features, device=device) for b in blocks]
    tokens = 0

    def on_proj(i: int):
        def hook(module, args):
            attn = blocks[i].attn
            o = args[0].reshape(*args[0].shape[:-1], attn.num_heads, attn.head_dim)  # (B, T, H, hd)
            w = module.weight.reshape(-1, attn.num_heads, attn.head_dim)  # (D, H, hd)
            heads[i].add_(torch.einsum("bthd,ehd->bthe", o.float(), w.float()).norm(dim=-1).sum((0, 1)))

        return hook

    def on_fc2(i: int):
        def hook(module, args):
            neurons[i].add_(args[0].float().abs().sum((0, 1)) * module.weight.float().norm(dim=0))

        return hook

    handles = [b.attn.proj.register_forward_pre_hook(on_proj(i)) for i, b in enumerate(blocks)]
    handles += [b.mlp.fc2.register_forward_pre_hook(on_fc2(i)) for i, b in enumerate(blocks)]
    try:
        model.eval()
        for x, _ in batches:
            x = x.to(device)
            model(x)
            tokens += x.shape[0] * (model.patch_embed.num_patches + model.num_prefix_tokens)
    finally:
        for h in handles:
            h.remove()
    return [h.cpu() / tokens for h in heads], [n.cpu() / tokens for n in neurons]


def choose(head_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor], cfg: StructuredConfig) -> Keep:
    """The highest-scored heads and neurons to keep, per block (indices in ascending order).

    scope 'block': every block keeps the same number; 'global': one ranking over all blocks, each
    block keeping at least its best unit of each kind.
    """
    cfg.check()
    keep: Keep = {"heads": [], "mlp": []}
    for key, scores, fraction, what in (
        ("heads", head_scores, cfg.heads, "heads"),
        ("mlp", neuron_scores, cfg.mlp, "MLP neurons"),
    ):
        if cfg.scope == "block":
            for s in scores:
                n = s.numel() - _num_removed(fraction, s.numel(), what)
                keep[key].append(sorted(s.topk(n).indices.tolist()))
            continue
        total = sum(s.numel() for s in scores)
        n = total - _num_removed(fraction, total, what)
        if n < len(scores):
            raise LotusError(f"removing {fraction:g} of the {what} leaves {n}, fewer than one per block: use a smaller fraction")
        flat = torch.cat([s.float().flatten() for s in scores]).clone()
        offsets = [0]
        for s in scores:
            offsets.append(offsets[-1] + s.numel())
        best = [offsets[b] + int(s.argmax()) for b, s in enumerate(scores)]  # every block keeps its best unit
        flat[best] = float("inf")
        chosen = flat.topk(n).indices.tolist()
        keep[key] = [sorted(i - offsets[b] for i in chosen if offsets[b] <= i < offsets[b + 1]) for b in range(len(scores))]
    return keep


def _slices(model: torch.nn.Module, keep: Keep) -> dict[str, tuple[int, torch.Tensor]]:
    """Parameter name -> (dimension, indices kept along it) for every tensor that shrinks."""
    out = {}
    for i, (blk, heads, neurons) in enumerate(zip(model.blocks, keep["heads"], keep["mlp"])):
        check_resizable(i, blk)
        if not heads or not neurons:
            raise LotusError(f"block {i} would keep no heads or no MLP neurons: every block needs at least one of each")
        if max(heads) >= blk.attn.num_heads or max(neurons) >= blk.mlp.fc2.in_features:
            raise LotusError(f"block {i}: the structure names heads or neurons the model does not have")
        p = f"blocks.{i}."
        rows, cols, n = _head_rows(blk.attn, heads), _head_cols(blk.attn, heads), torch.tensor(neurons)
        out[p + "attn.qkv.weight"] = (0, rows)
        out[p + "attn.proj.weight"] = (1, cols)
        out[p + "mlp.fc1.weight"] = (0, n)
        out[p + "mlp.fc2.weight"] = (1, n)
        if blk.attn.qkv.bias is not None:
            out[p + "attn.qkv.bias"] = (0, rows)
        if blk.mlp.fc1.bias is not None:
            out[p + "mlp.fc1.bias"] = (0, n)
    return out


def structure_masks(model: torch.nn.Module, keep: Keep) -> Masks:
    """The same pruning as zero masks on the unshrunk model: the removed heads' qkv rows and
    attn.proj columns, the removed neurons' fc1 rows and fc2 columns (weights only)."""
    params = dict(model.named_parameters())
    masks = {}
    for name, (dim, idx) in _slices(model, keep).items():
        if name.endswith(".weight"):
            m = torch.zeros_like(params[name], dtype=torch.bool)
            m.index_fill_(dim, idx, True)
            masks[name] = m
    return masks


@torch.no_grad()
def shrink_(model: torch.nn.Module, keep: Keep, masks: Masks | None = None) -> Masks | None:
    """Remove the heads and neurons `keep` leaves out, in place; returns `masks` (unstructured
    pruning masks of the unshrunk model) cut to the new shapes."""
    slices = _slices(model, keep)
    state = {
        name: t.index_select(slices[name][0], slices[name][1].to(t.device)) if name in slices else t
        for name, t in model.state_dict().items()
    }
    for blk, heads, neurons in zip(model.blocks, keep["heads"], keep["mlp"]):
        resize_block_(blk, len(heads), len(neurons))
    model.load_state_dict(state)
    if masks is None:
        return None
    return {name: m.index_select(slices[name][0], slices[name][1]) if name in slices else m for name, m in masks.items()}
