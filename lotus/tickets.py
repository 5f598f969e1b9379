"""Data lottery tickets: score every patch of every training image, keep the best ones.

A trained ViT's attention says which patches matter. The score of a patch is the attention the
class token pays it, averaged over heads and over every block by default (`layers` picks some
blocks; the last block alone finds the informative patches worst of all measured), or attention
rollout through the chosen blocks (Abnar & Zuidema, 2020: add the identity, row-normalise,
multiply through the layers), or gradient-weighted rollout (Chefer et al., 2021). Two corrections, both on by default:

- class-token sink (`cls_sink`): in every attention map used, the class token's attention to
  itself is replaced by the mean of the attention it pays to the other tokens, and the row is
  renormalised. With the direct score this leaves the ranking of patches unchanged (it rescales
  the row); with rollout it stops the self-loop of the class token from swamping what flows
  through it from the patches, and it keeps the heat maps on a comparable scale.
- high-norm outlier patches (`norm_outliers`): a patch token whose output norm (after the last
  block used) is an outlier within its image - robust z-score `(norm - median) / (1.4826 * MAD)`
  above `outlier_z` and more than `outlier_ratio` times the median norm - is one of the
  "register-like" tokens of Darcet et al. (2023), whose norms stand several times above the rest:
  it soaks up attention while carrying global, not local, information, usually on background.
  Its score is replaced by the mean score of its non-outlier 8-neighbours on the patch grid.

The tickets of a dataset are its per-image keep indices (exactly K = N - round(drop * N) per
image), the scores, and fingerprints of the data, patch grid and model; they are refused on any
other dataset, split or patch grid. timm's fused attention never builds the attention matrix,
so scoring rebuilds the rows it needs from each block's qkv projection, captured by a hook.

Augmentation moves the tickets with the image, and the top-K of the moved score map is kept, so
every image still keeps exactly K patches: under the padded crop the map is shifted by the crop's
shift (rounded to whole patches) and flipped with the image; under a resized crop (timm's
RandomResizedCrop) it is resampled to the crop's patch grid and flipped (`crop_scores`).

Fixed or sampled (`temperature`). At 0, the default and the method as published, each image
keeps its K highest-scored patches in every epoch. Above 0, each image's K patches are drawn
afresh in every batch, without replacement, patch i with weight `score_i ** (1 / temperature)`
(Gumbel-top-k, Kool et al. 2019): at 1 in proportion to its attention, towards 0 the fixed top-K,
towards infinity uniform. The random control then draws uniformly in every batch (patch
dropout), so sampled attention is compared with sampled random at the same K. The draws use
torch's global generator, which training seeds per epoch, so a resumed run draws the same.

Spread (`spread`). At 1 the K best patches of the image are kept wherever they are. At S > 1
every S x S block of the patch grid gives its best patch first, then its second best, and so on,
so the kept patches cover the image instead of clustering where the class token's attention
piles up (often a few neighbouring patches).

Balanced (`balance`). Off: each image keeps the patches it scores highest. On: each score is
first replaced by its rank among all the images' scores at the same patch position (a
percentile in (0, 1]), so an image keeps the patches it attends more than images usually do
there. Every position is then kept in about (1 - drop) of the images, as with random tickets,
while plain attention tickets keep central positions far more often than edge ones. The ranks are
over the whole split the tickets were made for.

Fused (`fuse`). Off: training sees the K kept patch tokens. On: one more token, the weighted mean
of the dropped patch tokens (after the positional embedding), as EViT (Liang et al., 2022) fuses
its inattentive tokens: weighted by attention score for attention tickets, uniform for random
ones, so the context the tickets drop still reaches the model as one summary token (K + 1 tokens).

Object coverage (`boxes`). Given the dataset's object boxes (boxes.tsv), `tickets.json` records how
much of the kept patches lie on the object and how much of the object is kept (`lotus.coverage`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lotus.checkpoint import map_checkpoint, save_checkpoint
from lotus.config import DataConfig, TicketConfig, check_spread, holdout, resolve_layers
from lotus.config import parse_layers as parse_layers  # re-exported: the settings live in lotus.config
from lotus.coverage import ImageBoxes, match_boxes, selection_coverage
from lotus.data import Batch, ImageData, make_loader
from lotus.device import distributed
from lotus.drop import num_keep
from lotus.errors import LotusError
from lotus.progress import Progress, report
from lotus.vit import TokenGatherViT, cls_attention

TICKETS_FILE = "tickets"  # DIR/tickets.safetensors + DIR/tickets.json


# ---------------------------------------------------------------------------------------------
# Pure maths on attention maps and scores


def correct_cls_sink(attn: torch.Tensor) -> torch.Tensor:
    """Replace the class token's self-attention by the mean of its row's other entries.

    Args:
        attn: (..., T) class-token rows or (..., T, T) full maps; the class token is token 0.
    Returns:
        The same shape, the class-token row renormalised to sum to one.
    """
    row = attn[..., 0, :] if attn.dim() >= 2 and attn.shape[-2] == attn.shape[-1] else attn
    row = row.clone()
    row[..., 0] = row[..., 1:].mean(-1)
    row = row / row.sum(-1, keepdim=True)
    if row.shape == attn.shape:
        return row
    out = attn.clone()
    out[..., 0, :] = row
    return out


def attention_rollout(attns: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through maps in forward order.

    Args:
        attns: per block, (B, T, T) head-averaged attention.
    Returns:
        (B, T, T) rolled-out attention: row i says how much of token i's output flows from each input.
    """
    eye = torch.eye(attns[0].shape[-1], dtype=attns[0].dtype, device=attns[0].device)
    rollout = eye.expand_as(attns[0])
    for attn in attns:
        a = attn + eye  # the residual connection
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def gradient_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Relevance of gradient-weighted attention (Chefer et al., 2021) through maps in forward order.

    Args:
        maps: per block, (B, T, T) attention weighted by its gradient, negatives clipped, heads averaged.
    Returns:
        (B, T, T) relevance: row i says how much each input token is relevant to token i's output.
    """
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    relevance = eye.expand_as(maps[0])
    for cam in maps:
        relevance = relevance + cam @ relevance  # the residual keeps what the block passes by
    return relevance


def gradient_attention(
    model: TokenGatherViT, images: torch.Tensor, labels: torch.Tensor, layers: list[int]
) -> list[torch.Tensor]:
    """Per block in `layers`, (B, T, T): E_heads[(dA ⊙ A)+], the attention maps A weighted by the
    gradient of each image's own label logit (Chefer et al., 2021), so the maps say which tokens
    the class decision flows from, not only where attention goes.

    timm's fused attention never builds A, so the blocks scored run their plain attention for the
    pass, and A is caught where timm applies attention dropout to it.
    """
    attns = [model.blocks[i].attn for i in layers]
    fused = [a.fused_attn for a in attns]
    caught: list[torch.Tensor] = []
    hooks = [a.attn_drop.register_forward_hook(lambda m, args, out: caught.append(out)) for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(images.clone())  # a normal tensor: inference tensors cannot be saved for backward
            grads = torch.autograd.grad(logits.gather(1, labels.view(-1, 1).to(logits.device)).sum(), caught)
    finally:
        for a, f in zip(attns, fused):
            a.fused_attn = f
        for h in hooks:
            h.remove()
    return [(g * a).clamp_min(0).mean(1).detach() for g, a in zip(grads, caught)]


def _attention_maps(model: TokenGatherViT, images: torch.Tensor, layers: list[int], cfg: TicketConfig) -> list[torch.Tensor]:
    """Per block in `layers`, the heads' mean attention: class-token rows (B, T) for 'cls', full
    maps (B, T, T) for 'rollout', with the class-token sink corrected when `cfg.cls_sink`."""
    full = cfg.method == "rollout"
    qkvs: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[i].attn.qkv.register_forward_hook(lambda m, a, out, i=i: qkvs.__setitem__(i, out)) for i in layers]
    try:
        model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for i in layers:
        attn = cls_attention(model.blocks[i].attn, qkvs[i], full).mean(1)  # heads averaged: (B, T[, T])
        maps.append(correct_cls_sink(attn) if cfg.cls_sink else attn)
    return maps


def norm_outliers(norms: torch.Tensor, z: float, ratio: float) -> torch.Tensor:
    """(B, N) bool: tokens whose norm, within their image, has a robust z-score above `z` and
    is more than `ratio` times the median (the z-score alone flags too much when most patches
    are near-identical background)."""
    median = norms.median(-1, keepdim=True).values
    mad = (norms - median).abs().median(-1, keepdim=True).values
    robust_z = (norms - median) / (1.4826 * mad).clamp_min(1e-6)
    return (robust_z > z) & (norms > ratio * median)


def fill_from_neighbours(scores: torch.Tensor, outliers: torch.Tensor, grid: int) -> torch.Tensor:
    """Replace outlier scores by the mean of their non-outlier 8-neighbours on the patch grid.

    Args:
        scores: (B, N) patch scores, N = grid * grid in row-major order.
        outliers: (B, N) bool.
    Returns:
        (B, N) scores; an outlier with no valid neighbour gets its image's mean valid score.
    """
    valid = (~outliers).float().view(-1, 1, grid, grid)
    kernel = torch.ones(1, 1, 3, 3, dtype=scores.dtype, device=scores.device)
    kernel[..., 1, 1] = 0
    total = F.conv2d(scores.view(-1, 1, grid, grid) * valid, kernel, padding=1)
    count = F.conv2d(valid, kernel, padding=1)
    image_mean = (scores * (~outliers)).sum(-1) / (~outliers).sum(-1).clamp_min(1)
    filled = torch.where(count > 0, total / count.clamp_min(1), image_mean.view(-1, 1, 1, 1))
    return torch.where(outliers, filled.view_as(scores), scores)


def keep_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K) indices of the K highest-scored patches of each image, in ascending order."""
    return scores.topk(k, dim=-1).indices.sort(-1).values


def sample_keys(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Keys whose top-K is a draw of K patches without replacement, patch i with weight
    `scores_i ** (1 / temperature)` (Gumbel-top-k); scores of -inf stay -inf (never drawn before
    any other). Uses torch's global generator."""
    u = torch.rand(scores.shape, device=scores.device).clamp_(1e-20, 1 - 1e-7)
    keys = scores.clamp_min(1e-30).log() / temperature - (-u.log()).log()
    return torch.where(scores == float("-inf"), scores, keys)


def spread_scores(scores: torch.Tensor, grid: int, cell: int) -> torch.Tensor:
    """Scores whose top-K keeps patches spread over the image: every `cell` x `cell` block of the
    grid gives its best patch first, then its second best, and so on; within one round the
    higher-scored patches come first. -inf (patches moved in from the padding) stays last.

    Args:
        scores: (B, N) patch scores, N = grid * grid in row-major order; grid % cell == 0.
    """
    B, g = scores.shape[0], grid // cell
    blocks = scores.view(B, g, cell, g, cell).permute(0, 1, 3, 2, 4).reshape(B, g * g, cell * cell)
    rank = blocks.argsort(-1, descending=True).argsort(-1)  # 0 = best of its block
    rank = rank.view(B, g, g, cell, cell).permute(0, 1, 3, 2, 4).reshape(B, -1).to(scores.dtype)
    finite = torch.isfinite(scores)
    low = torch.where(finite, scores, torch.full_like(scores, float("inf"))).min(-1, keepdim=True).values
    high = torch.where(finite, scores, torch.full_like(scores, float("-inf"))).max(-1, keepdim=True).values
    unit = (scores - low) / (high - low).clamp_min(1e-12)  # in [0, 1]: orders patches within a round
    return torch.where(finite, -rank + 0.5 * unit, torch.full_like(scores, float("-inf")))


def balance_scores(scores: torch.Tensor) -> torch.Tensor:
    """(num_images, N) scores replaced by their rank among all images' scores at the same patch
    position, as a fraction in (0, 1]: an image's top-K are then the patches it scores higher
    than other images do there, and every position is kept about equally often."""
    ranks = scores.argsort(0).argsort(0)
    return (ranks + 1).to(scores.dtype) / scores.shape[0]


def select_keep(scores: torch.Tensor, k: int, grid: int, spread: int = 1) -> torch.Tensor:
    """(B, K) indices kept: the K highest scores, or spread over `spread` x `spread` blocks."""
    return keep_from_scores(spread_scores(scores, grid, spread) if spread > 1 else scores, k)


def transport_scores(scores: torch.Tensor, grid: int, patch_size: int, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Move (B, N) score maps with their images: shift by whole patches, then flip left-right.

    Patches that enter from outside the image (the crop's padding) get -inf: they are the first
    dropped. `shift` is (B, 2) (dy, dx) in pixels, rounded to the nearest whole patch.
    """
    B = scores.shape[0]
    maps = scores.view(B, grid, grid)
    dy = torch.round(shift[:, 0].float() / patch_size).long()
    dx = torch.round(shift[:, 1].float() / patch_size).long()
    rows = torch.arange(grid, device=scores.device)[None, :] - dy[:, None]  # (B, G) source row of each row
    cols = torch.arange(grid, device=scores.device)[None, :] - dx[:, None]
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    inside = ((rows >= 0) & (rows < grid))[:, :, None] & ((cols >= 0) & (cols < grid))[:, None, :]
    moved = maps[torch.arange(B)[:, None, None], rows.clamp(0, grid - 1)[:, :, None], cols.clamp(0, grid - 1)[:, None, :]]
    return torch.where(inside, moved, torch.full_like(moved, float("-inf"))).view(B, -1)


def crop_scores(scores: torch.Tensor, grid: int, crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Move (B, N) score maps with their images through a resized crop, then a left-right flip.

    The score map covers the whole image (scoring sees it whole, resized to a square). Each patch
    of the crop's grid takes the score at its centre, interpolated bilinearly between the score
    map's patch centres; a crop reaching past the scored square (possible only after rounding)
    takes the nearest border score.

    Args:
        crop: (B, 4) (top, left, height, width) of the crop as fractions of the image.
        flip: (B,) bool, the crop was flipped left-right.
    """
    B = scores.shape[0]
    centres = (torch.arange(grid, device=scores.device, dtype=torch.float32) + 0.5) / grid  # (G,) in the crop
    crop = crop.to(scores.device, torch.float32)
    ys = crop[:, :1] + crop[:, 2:3] * centres  # (B, G) as fractions of the image
    xs = crop[:, 1:2] + crop[:, 3:4] * centres
    xs = torch.where(flip.to(scores.device)[:, None], xs.flip(-1), xs)
    points = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1) * 2 - 1  # (B, G, G, (x, y))
    maps = scores.view(B, 1, grid, grid).float()
    moved = F.grid_sample(maps, points, mode="bilinear", padding_mode="border", align_corners=False)
    return moved.view(B, -1).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# Scoring a dataset with a model


@torch.inference_mode()
def score_batch(
    model: TokenGatherViT, images: torch.Tensor, cfg: TicketConfig, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch scores of a batch: (B, N) scores and (B, N) high-norm outlier flags. `labels`, the
    images' classes, are what the gradient of the 'grad' method is taken of."""
    layers = resolve_layers(cfg, len(model.blocks))
    outputs: dict[str, torch.Tensor] = {}
    hook = model.blocks[layers[-1]].register_forward_hook(lambda m, a, out: outputs.__setitem__("x", out.detach()))
    try:
        if cfg.method == "grad":
            if labels is None:
                raise LotusError("--method grad weighs attention by the gradient of each image's label: score labelled images")
            maps = gradient_attention(model, images, labels, layers)
        else:
            maps = _attention_maps(model, images, layers, cfg)
    finally:
        hook.remove()
    prefix = model.num_prefix_tokens
    if cfg.method == "cls":
        scores = torch.stack(maps).mean(0)[:, prefix:]
    else:
        rolled = gradient_rollout(maps) if cfg.method == "grad" else attention_rollout(maps)
        scores = rolled[:, 0, prefix:]
    norms = outputs["x"][:, prefix:].float().norm(dim=-1)  # (B, N) output norm of each patch token
    outliers = (
        norm_outliers(norms, cfg.outlier_z, cfg.outlier_ratio) if cfg.norm_outliers else torch.zeros_like(norms, dtype=torch.bool)
    )
    if cfg.norm_outliers:
        scores = fill_from_neighbours(scores, outliers, int(scores.shape[-1] ** 0.5))
    return scores, outliers


# What identifies a split in its fingerprint: the dataset's name is left out, since an ImageFolder's
# name is its path as given (data/cifar10 and /work/data/cifar10 are the same images).
IDENTITY = ("split", "num_images", "img_size", "sha256")


def fingerprint(data: ImageData) -> dict[str, Any]:
    """What identifies a split: its name, size, and a hash of its labels and its pixels, or for
    image files (held in memory or streamed alike) of their paths and byte sizes: hashing the
    pixels of a streamed split would mean decoding all of it again at every check."""
    h = hashlib.sha256()
    if data.files is None:
        h.update(data.images.numpy().tobytes())
    else:
        for path, rel in zip(data.paths(range(len(data))), data.files):
            h.update(f"{rel}\t{path.stat().st_size}\n".encode())
    h.update(data.labels.numpy().tobytes())
    return {
        "dataset": data.name,
        "split": data.split,
        "num_images": len(data),
        "img_size": data.img_size,
        "sha256": h.hexdigest(),
    }


@dataclass
class Tickets:
    """Per-image keep indices and patch scores of one dataset split."""

    keep_idx: torch.Tensor  # (num_images, K) integer, ascending (int16, memory-mapped, when loaded from a file)
    scores: torch.Tensor  # (num_images, N) float32; higher = more informative
    grid: int  # patches per side
    patch_size: int  # patch side in pixels
    meta: dict[str, Any]  # config, fingerprints, counts

    @property
    def num_keep(self) -> int:
        return self.keep_idx.shape[1]

    @property
    def temperature(self) -> float:
        return self.meta["config"].get("temperature", 0.0)

    @property
    def fuse(self) -> bool:
        return self.meta["config"].get("fuse", False)

    @cached_property
    def keys(self) -> torch.Tensor:
        """(num_images, N) what the top-K is taken of: the scores, or their ranks by position (`balance`)."""
        return _selection_keys(self.scores, self.meta["config"])

    def for_batch(self, batch: Batch) -> torch.Tensor:
        """(B, K) keep indices of a batch's images, moved with their augmentation (and drawn
        afresh when the tickets are sampled)."""
        if not _moves(batch) and not self.temperature:
            return self.keep_idx[batch.index].long()
        return self._keep(self._moved(self.keys, batch))

    def tokens_for_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What training feeds the model: the (B, K) keep indices, and with `fuse` the (B, N)
        weights of the fused token (None without): over the dropped patches that lie inside the
        image, in proportion to their attention score (EViT), or uniform for random tickets (and
        when the dropped patches hold no attention)."""
        if not self.fuse:
            return self.for_batch(batch), None
        keys = self._moved(self.keys, batch)
        scores = keys if self.keys is self.scores else self._moved(self.scores, batch)
        keep = self.keep_idx[batch.index].long() if not _moves(batch) and not self.temperature else self._keep(keys)
        dropped = torch.isfinite(scores).float().scatter(1, keep, 0.0)  # dropped, and inside the image
        weights = dropped if self.meta["config"]["select"] == "random" else dropped * scores.clamp_min(0)
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, dropped)  # no attention left: uniform
        return keep, weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)

    def _moved(self, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        """A batch's rows of per-patch `values` (scores or keys), moved with its augmentation."""
        values = values[batch.index]
        if self.temperature and self.meta["config"]["select"] == "random":
            values = torch.ones_like(values)  # the control: uniform draws
        if batch.shift is not None:
            values = transport_scores(values, self.grid, self.patch_size, batch.shift, batch.flip)
        elif batch.crop is not None:
            values = crop_scores(values, self.grid, batch.crop, batch.flip)
        return values

    def _keep(self, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature:
            scores = sample_keys(scores, self.temperature)
        return select_keep(scores, self.num_keep, self.grid, self.meta["config"].get("spread", 1))

    def check(self, data: ImageData, grid: int, patch_size: int) -> None:
        """Refuse tickets made for another dataset, split or patch grid."""
        made_for, this = self.meta["data"], fingerprint(data)
        if any(made_for.get(key) != this[key] for key in IDENTITY):
            raise LotusError(
                f"tickets were made for {made_for['dataset']} ({made_for['split']}, {made_for['num_images']} images), "
                f"not {data.name} ({data.split}, {len(data)} images): make tickets for this data, with the same "
                "--val-fraction (the images held out for validation leave the training split), with `lotus tickets`"
            )
        if (grid, patch_size) != (self.grid, self.patch_size):
            raise LotusError(
                f"tickets are for a {self.grid}x{self.grid} grid of {self.patch_size}px patches, the model has "
                f"{grid}x{grid} of {patch_size}px: make tickets with this model's patch grid"
            )


def _moves(batch: Batch) -> bool:
    """Whether a batch's augmentation moved its images' content (a crop; a flip comes with one)."""
    return batch.shift is not None or batch.crop is not None


def make_tickets(
    model: TokenGatherViT,
    data: ImageData,
    mean: list[float],
    std: list[float],
    cfg: TicketConfig,
    *,
    model_sha256: str | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    workers: int | None = None,
) -> Tickets:
    """Score every patch of every image of `data` and keep the top K per image.

    Under torchrun each process scores its share of the batches (`shard_positions`) and every
    process ends with all the scores, identical to one process's: the batches are the ones a
    single process would score, so each image's scores come out of the same computation.

    Args:
        progress: told ("scoring patches", batches done, batches) as the scoring runs.
        workers: loader workers, for a streamed split (see lotus.stream).
    """
    grid = model.patch_embed.grid_size[0]
    patch_size = model.patch_embed.patch_size[0]
    check_spread(cfg.spread, grid)
    N = grid * grid
    k = num_keep(N, cfg.drop)
    model.eval().to(device)
    scores, outlier_count = [], 0
    if cfg.select == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        scores = [torch.rand(len(data), N, generator=gen)]
    else:
        rank, world = distributed()
        mine = shard_positions(len(data), cfg.batch_size, rank, world)
        loader = make_loader(data if world == 1 else data.subset(mine), cfg.batch_size, mean, std, workers=workers)
        report(progress, "scoring patches", 0, len(loader))
        for i, batch in enumerate(loader):
            s, outliers = score_batch(model, batch.images.to(device, non_blocking=True), cfg, batch.labels)
            scores.append(s.cpu())
            outlier_count += int(outliers.sum())
            report(progress, "scoring patches", i + 1, len(loader))
        if world > 1:
            scores, outlier_count = [_gathered(torch.cat(scores), len(data), cfg.batch_size)], _summed(outlier_count)
    scores = torch.cat(scores).float()
    meta = {
        "config": asdict(cfg),
        "num_keep": k,
        "num_patches": N,
        "data": fingerprint(data),
        "model_sha256": model_sha256,
        "outlier_patches": outlier_count,
        "layers": resolve_layers(cfg, len(model.blocks)) if cfg.select == "attention" else None,
    }
    return _cut(scores, grid, patch_size, meta)


def shard_positions(num_images: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The positions process `rank` of `world` scores: the images of every `world`-th batch of
    `batch_size` from its `rank`-th, so each batch is one a single process would score."""
    starts = torch.arange(rank * batch_size, num_images, world * batch_size)
    return torch.cat(
        [torch.arange(start, min(start + batch_size, num_images)) for start in starts.tolist()]
        or [torch.zeros(0, dtype=torch.long)]
    )


def _gathered(mine: torch.Tensor, num_images: int, batch_size: int) -> torch.Tensor:
    """Every process's (rows, N) scores, put back in image order, in every process."""
    import torch.distributed as dist

    rank, world = distributed()
    on = _collective_device()
    shards = [shard_positions(num_images, batch_size, r, world) for r in range(world)]
    rows = max(len(shard) for shard in shards)
    padded = torch.zeros(rows, mine.shape[1], device=on)  # all_gather needs equal shapes
    padded[: len(mine)] = mine.to(on)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    scores = torch.empty(num_images, mine.shape[1])
    for shard, part in zip(shards, gathered):
        scores[shard] = part[: len(shard)].cpu()
    return scores


def _collective_device() -> torch.device:
    """Where the process group's tensors must live: the GPU for NCCL, the CPU for gloo."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _summed(count: int) -> int:
    import torch.distributed as dist

    on = _collective_device()
    total = torch.tensor([count], device=on)
    dist.all_reduce(total)
    return int(total.item())


# The settings that decide the scores; the others (drop, temperature, spread, balance, fuse) only cut them.
SCORING_FIELDS = ("select", "method", "layers", "cls_sink", "norm_outliers", "outlier_z", "outlier_ratio")


def recut_tickets(tickets: Tickets, cfg: TicketConfig) -> Tickets:
    """The same scores cut again with `cfg`: another drop ratio, temperature, spread, balance or fuse,
    without a scoring pass. Refused when `cfg` would score differently (selection, method,
    blocks, corrections; for random tickets also the seed)."""
    made, wanted = tickets.meta["config"], asdict(cfg)
    fields = SCORING_FIELDS + (("seed",) if cfg.select == "random" else ())
    differ = [
        f"{f} {made.get(f)!r} (asked: {wanted[f]!r})" for f in fields if json.dumps(made.get(f)) != json.dumps(wanted[f])
    ]  # as JSON: the saved config holds lists for tuples
    if differ:
        raise LotusError(f"these tickets were scored with other settings, {', '.join(differ)}: ask for the same, or score again")
    check_spread(cfg.spread, tickets.grid)
    earlier = {k: v for k, v in tickets.meta.items() if k != "object_coverage"}  # measured on the earlier cut
    meta = {**earlier, "config": wanted, "num_keep": num_keep(tickets.grid**2, cfg.drop)}
    return _cut(tickets.scores, tickets.grid, tickets.patch_size, meta)


def _selection_keys(scores: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    return balance_scores(scores) if config.get("balance") else scores


def _cut(scores: torch.Tensor, grid: int, patch_size: int, meta: dict[str, Any]) -> Tickets:
    """Tickets keeping each image's top-K of its selection keys (see `Tickets.keys`)."""
    keys = _selection_keys(scores, meta["config"])
    return Tickets(select_keep(keys, meta["num_keep"], grid, meta["config"]["spread"]), scores, grid, patch_size, meta)


def save_tickets(tickets: Tickets, out_dir: str | Path) -> Path:
    # Keep indices fit int16 for any grid up to 181x181; scores stay fp32 (N floats per image).
    tensors = {"keep_idx": tickets.keep_idx.to(torch.int16), "scores": tickets.scores}
    return save_checkpoint(
        Path(out_dir) / TICKETS_FILE, tensors, {"grid": tickets.grid, "patch_size": tickets.patch_size, **tickets.meta}
    )


def load_tickets(path: str | Path) -> Tickets:
    """Load tickets from a folder written by `lotus tickets` (or its tickets.safetensors),
    memory-mapped: a batch reads its images' rows from the file, so the tickets of a dataset of
    any size cost no memory of their own, and processes on one machine share the page cache."""
    path = Path(path)
    if path.is_dir():
        path = path / TICKETS_FILE
    tensors, meta = map_checkpoint(path)
    if "keep_idx" not in tensors:
        raise LotusError(f"{path} holds no tickets: pass the folder `lotus tickets --out` wrote")
    grid, patch_size = meta.pop("grid"), meta.pop("patch_size")
    return Tickets(tensors["keep_idx"], tensors["scores"], grid, patch_size, meta)


def tickets_from_checkpoint(
    checkpoint: str | Path,
    data_cfg: DataConfig,
    cfg: TicketConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    progress: Progress | None = None,
    scores_from: str | Path | None = None,
) -> Tickets:
    """What `lotus tickets` runs: score a dataset's training split (the images training uses: the
    validation images held out of it are not scored) with a checkpoint, write
    `out_dir/tickets.safetensors` + `tickets.json` and the figure `out_dir/tickets.png`.

    With `cfg.boxes` (the dataset's boxes.tsv, matched to the images before any scoring),
    `tickets.json` also holds `object_coverage` (see `lotus.coverage`): the share of kept
    patches that touch the object box and the share of the box's patches kept, averaged over
    the images with a box; the figure outlines each shown image's box.

    Args:
        progress: told ("scoring patches", batches done, batches) as the scoring runs, or
            ("cutting earlier scores", 0 then 1, 1) with `scores_from`.
        scores_from: earlier tickets of the same checkpoint and data: their scores are cut again
            with `cfg` (see `recut_tickets`) instead of running the model over the data.
    """
    from lotus.checkpoint import load_model
    from lotus.data import load_split_for_model
    from lotus.device import resolve_device

    dev = resolve_device(device)
    model, meta = load_model(checkpoint, dev)
    pre = meta["preprocess"]
    data = load_split_for_model(data_cfg, pre, "train")
    boxes = match_boxes(cfg.boxes, data) if cfg.boxes else None  # a wrong file fails before the scoring pass
    if scores_from is None:
        tickets = make_tickets(
            model,
            data,
            pre["mean"],
            pre["std"],
            cfg,
            model_sha256=meta["sha256"],
            device=dev,
            progress=progress,
            workers=data_cfg.workers,
        )
    else:
        report(progress, "cutting earlier scores", 0, 1)
        tickets = _recut_earlier(scores_from, checkpoint, meta["sha256"], model, data, cfg)
        report(progress, "cutting earlier scores", 1, 1)
    tickets.meta["holdout"] = holdout(data_cfg)  # the training split is the stored one less these validation images
    rank, world = distributed()
    if rank == 0:  # one process writes; the others wait until the tickets are there
        _write_tickets(tickets, data, boxes, Path(out_dir))
    if world > 1:
        torch.distributed.barrier()
    return tickets


def _recut_earlier(
    scores_from: str | Path, checkpoint: str | Path, model_sha256: str, model: TokenGatherViT, data: ImageData, cfg: TicketConfig
) -> Tickets:
    """Earlier tickets of this data, cut again with `cfg`; refused when another model scored them."""
    earlier = load_tickets(scores_from)
    earlier.check(data, model.patch_embed.grid_size[0], model.patch_embed.patch_size[0])
    if cfg.select == "attention" and earlier.meta["model_sha256"] != model_sha256:
        raise LotusError(
            f"the tickets in {scores_from} were scored by another model than {checkpoint}: "
            "pass the checkpoint that scored them, or score again without --scores-from"
        )
    return recut_tickets(earlier, cfg)


def _write_tickets(tickets: Tickets, data: ImageData, boxes: ImageBoxes | None, out_dir: Path) -> None:
    """Save the tickets (with their object coverage when there are boxes) and draw the figure."""
    from lotus.plots import save_tickets_figure  # matplotlib: only where a figure is drawn

    if boxes is not None:
        kept = tickets.keep_idx[boxes.index]
        tickets.meta["object_coverage"] = selection_coverage(kept, boxes, tickets.grid, tickets.patch_size)
    save_tickets(tickets, out_dir)
    cfg = tickets.meta["config"]
    show = _one_per_class(data.labels, 16)
    title = f"{cfg['select']} tickets, drop {cfg['drop']:g}: {tickets.num_keep} of {tickets.grid**2} patches kept"
    save_tickets_figure(
        out_dir / "tickets.png",
        data.take(show).images,
        tickets.scores[show] if cfg["select"] == "attention" else None,
        tickets.keep_idx[show].long(),
        tickets.grid,
        title,
        boxes=boxes.at_input(show, data.img_size) if boxes is not None else None,
    )


def _one_per_class(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of up to `count` images cycling through the classes, so a figure shows them all."""
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in labels.unique()]
    picks: list[int] = []
    for rank in range(max(len(idx) for idx in by_class)):
        picks += [idx[rank] for idx in by_class if rank < len(idx)]
        if len(picks) >= count:
            break
    return torch.tensor(picks[:count], dtype=torch.long)
