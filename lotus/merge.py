"""Token merging (ToMe, Bolya et al., ICLR 2023): the training-free peer of patch dropping.

Where `TokenGatherViT.forward_dropping` discards patches once, ToMe merges a few in every block:
between a block's attention and its MLP, the patch tokens are split alternately into sets A and
B, each A token is paired with its most similar B token (cosine of the attention keys, heads
averaged), and the `merge_per_block` most similar pairs are fused into one token, the
size-weighted average of the two. Each token carries its size (how many patches it stands for),
and attention adds log(size) to the logits of each key ("proportional attention"), so a merged
token weighs what its patches would. The class and register tokens are never merged, and the
prediction comes from the final class token, as in the model's own forward.

It runs an off-the-shelf model as it is: no weight changes, no training. The maths are pure
functions on tensors (`bipartite_soft_matching`, `merge_tokens`); `forward_merging` runs a timm
ViT's own modules with them, and `TokenMerging` wraps that as a module (for ONNX export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from lotus.errors import LotusError


def merge_schedule(num_patches: int, depth: int, merge_per_block: int) -> list[int]:
    """Patch tokens merged away in each block: `merge_per_block` (ToMe's constant r), but never
    more than half of those left, since each merge pairs an A token with a B token; at least one
    patch token always remains."""
    merges = []
    for _ in range(depth):
        merges.append(min(merge_per_block, num_patches // 2))
        num_patches -= merges[-1]
    return merges


def bipartite_soft_matching(keys: torch.Tensor, num_merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens to merge: tokens 0, 2, 4, ... (set A) each pick their most similar token
    among 1, 3, 5, ... (set B); the `num_merge` A tokens with the most similar picks go.

    Matching A to B only (never within a set) keeps it one matrix product with no iteration,
    and no token can be both merged away and merged into.

    Args:
        keys: (B, N, C) the tokens' attention keys (heads averaged): similarity is their cosine.
        num_merge: A tokens merged away, at most ceil(N / 2).
    Returns:
        kept_idx (B, Na - num_merge) the A tokens that stay, src_idx (B, num_merge) the A tokens
        merged away, dst_idx (B, num_merge) the B token each merges into; A and B indices count
        within their set.
    """
    keys = keys / keys.norm(dim=-1, keepdim=True)
    similarity = keys[:, ::2] @ keys[:, 1::2].transpose(-1, -2)  # (B, Na, Nb)
    best, best_idx = similarity.max(dim=-1)  # (B, Na) each A token's closest B token
    order = best.argsort(dim=-1, descending=True)
    src_idx, kept_idx = order[:, :num_merge], order[:, num_merge:]
    return kept_idx, src_idx, best_idx.gather(1, src_idx)


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, matching: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a `bipartite_soft_matching`: each merged token is the size-weighted average of the
    tokens it absorbed, and its size their sum.

    Sums are merged with scatter_add (not a scatter 'mean', which ONNX lacks): the weighted
    features and the sizes travel together as D + 1 channels, and the division comes after.

    Args:
        x: (B, N, D) tokens; size: (B, N, 1) how many patches each stands for.
    Returns:
        (B, N - num_merge, D) tokens and (B, N - num_merge, 1) sizes: the kept A tokens, then B.
    """
    kept_idx, src_idx, dst_idx = matching
    width = x.shape[-1] + 1
    sums = torch.cat([x * size, size], dim=-1)  # (B, N, D + 1)
    a, b = sums[:, ::2], sums[:, 1::2]
    src = a.gather(1, src_idx.unsqueeze(-1).expand(-1, -1, width))
    b = b.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, width), src)
    sums = torch.cat([a.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, width)), b], dim=1)
    return sums[..., :-1] / sums[..., -1:], sums[..., -1:]


def merge_patches(
    x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, num_merge: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `num_merge` pairs of patch tokens; the prefix (class, register) tokens stay first and
    untouched, since the prediction is read from the class token.

    Args:
        x: (B, P + N, D) tokens; size: (B, P + N, 1) their sizes; keys: (B, P + N, C) their keys.
    """
    p = num_prefix_tokens
    matching = bipartite_soft_matching(keys[:, p:], num_merge)
    patches, patch_size = merge_tokens(x[:, p:], size[:, p:], matching)
    return torch.cat([x[:, :p], patches], dim=1), torch.cat([size[:, :p], patch_size], dim=1)


def proportional_attention(
    attn: torch.nn.Module, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's `Attention.forward` with log(size) added to the logits of each key, so that a token
    of size s is attended to as s copies of it would be; also returns the keys, heads averaged,
    which the matching compares.

    Args:
        x: (B, T, D) normalised tokens; size: (B, T, 1) or None (all ones: no bias).
    Returns:
        (B, T, D) attention output, (B, T, head_dim) keys.
    """
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().view(B, 1, 1, T)  # the same for every query and head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, T, attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out), k.mean(1)


def merging_block(
    blk: torch.nn.Module, x: torch.Tensor, size: torch.Tensor | None, num_merge: int, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm's `Block.forward` with proportional attention and `num_merge` merges between the
    attention and the MLP. `size` None means every token has size 1 (no merge yet)."""
    out, keys = proportional_attention(blk.attn, blk.norm1(x), size)
    x = x + blk.drop_path1(blk.ls1(out))
    if num_merge > 0:
        size = torch.ones_like(x[..., :1]) if size is None else size
        x, size = merge_patches(x, size, keys, num_merge, num_prefix_tokens)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


def check_mergeable(model: VisionTransformer) -> None:
    """Refuse models whose prediction is not read from the class token: an average over merged
    tokens would need their sizes."""
    if model.global_pool != "token" or not model.has_class_token:
        raise LotusError(f"token merging needs a class-token model (global_pool 'token'), not {model.global_pool!r}")


def forward_merging(model: VisionTransformer, x: torch.Tensor, merge_per_block: int) -> torch.Tensor:
    """Logits of a timm ViT whose blocks each merge `merge_per_block` patch tokens (ToMe's r).

    The model's weights and class are left as they are. merge_per_block = 0 gives the model's
    own logits. For inference (eval mode): dropout and patch dropout are not applied.

    Args:
        x: (B, 3, H, W) images.
    Returns:
        (B, classes) logits.
    """
    check_mergeable(model)
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    num_patches = x.shape[1] - model.num_prefix_tokens
    size = None
    for blk, num_merge in zip(model.blocks, merge_schedule(num_patches, len(model.blocks), merge_per_block)):
        x, size = merging_block(blk, x, size, num_merge, model.num_prefix_tokens)
    return model.forward_head(model.norm(x))


class TokenMerging(torch.nn.Module):
    """A ViT that merges `merge_per_block` tokens in each block: images -> logits (ONNX-exportable)."""

    def __init__(self, model: VisionTransformer, merge_per_block: int):
        super().__init__()
        check_mergeable(model)
        self.model = model
        self.merge_per_block = merge_per_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_merging(self.model, x, self.merge_per_block)
