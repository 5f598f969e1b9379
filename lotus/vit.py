"""timm Vision Transformers that can run on a subset of their patch tokens.

`build_model` creates any plain timm `VisionTransformer` and swaps its class for
`TokenGatherViT` (the way ToMe patches timm models), which differs from timm's only in
`forward_features`: after the positional embedding, the patch tokens named by `keep_idx` are
gathered (the class and register tokens always stay), and only those go through the blocks.
Its starting weights are timm's: random, the hub's, or a timm weight file, which timm fits to the
model as it fits hub weights (new classifier, position embeddings resampled to the patch grid).

A model may also have narrower blocks than its architecture (fewer attention heads, fewer MLP
neurons: structured pruning). `structure_of` reads the per-block widths a checkpoint records,
and `reshape_` gives a freshly built model those widths, so a shrunk model rebuilds from its
checkpoint like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer

from lotus.config import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported: the settings live in lotus.config
from lotus.config import ModelConfig, default_patch_size, weight_file_missing
from lotus.errors import LotusError


def gather_tokens(
    x: torch.Tensor, keep_idx: torch.Tensor, num_prefix_tokens: int, fuse: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the prefix (class, register) tokens and the patch tokens at `keep_idx`.

    Args:
        x: (B, P + N, D) tokens, P prefix tokens then N patch tokens.
        keep_idx: (B, K) indices into the N patch tokens, int64.
        fuse: optional (B, N) weights over the patch tokens (zero on the kept ones): one more
            token is appended, the weighted sum of the patch tokens (EViT's fused token).
    Returns:
        (B, P + K, D) tokens, or (B, P + K + 1, D) with `fuse`.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    kept = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    if fuse is None:
        return torch.cat([prefix, kept], dim=1)
    fused = torch.einsum("bn,bnd->bd", fuse.to(patches.dtype), patches).unsqueeze(1)
    return torch.cat([prefix, kept, fused], dim=1)


class TokenGatherViT(VisionTransformer):
    """timm's VisionTransformer with `forward(x, keep_idx=None, fuse=None)`.

    Differs from timm only by the `gather_tokens` call after `_pos_embed`; attention masks,
    causal attention and gradient checkpointing are not used by LOTUS and not supported here.
    """

    def forward_features(
        self, x: torch.Tensor, keep_idx: torch.Tensor | None = None, fuse: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)  # positional embeddings are added before any patch is dropped
        if keep_idx is not None:
            x = gather_tokens(x, keep_idx, self.num_prefix_tokens, fuse)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward(
        self,
        x: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        fuse: torch.Tensor | None = None,
        dropping: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits from every patch, from the `keep_idx` patches (data lottery tickets), or with
        `dropping` = (num_keep, select_block) as `forward_dropping` (drop-aware training: through
        `forward`, so DDP and torch.compile wrap it as they wrap any forward)."""
        if dropping is not None:
            return self.forward_dropping(x, *dropping)
        x = self.forward_features(x, keep_idx, fuse)
        return self.forward_head(x)

    def forward_dropping(self, x: torch.Tensor, num_keep: int, select_block: int) -> torch.Tensor:
        """Inference that drops patches chosen by the model's own attention.

        Blocks up to `select_block` run on every token; the class token's attention in
        `select_block` (heads averaged) scores the patches, and that block and the rest run on
        the class token and the `num_keep` best patches only (`selecting_block`).
        With num_keep = all patches the logits equal `forward`'s (the kept tokens are merely
        reordered, and attention does not depend on the order).
        """
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        for blk in self.blocks[:select_block]:
            x = blk(x)
        x = selecting_block(self.blocks[select_block], x, num_keep, self.num_prefix_tokens)
        for blk in self.blocks[select_block + 1 :]:
            x = blk(x)
        return self.forward_head(self.norm(x))


def selecting_block(blk: torch.nn.Module, x: torch.Tensor, num_keep: int, num_prefix_tokens: int) -> torch.Tensor:
    """timm's `Block.forward` that keeps only the prefix tokens and the `num_keep` patches its
    class token attends to most (heads averaged), in that order.

    Keys and values come from every token, but queries, the output projection and the MLP are
    computed for the kept tokens alone: each is per token, so the kept tokens come out exactly
    as the whole block would give them, and the dropped ones cost only their keys and values.

    Args:
        x: (B, P + N, D) tokens, P prefix tokens then N patch tokens.
    Returns:
        (B, P + num_keep, D) tokens.
    """
    attn, h = blk.attn, blk.norm1(x)
    B = h.shape[0]
    q, k, v = split_heads(attn, attn.qkv(h))
    k = attn.k_norm(k)
    scores = attention_weights(attn, attn.q_norm(q[:, :, :1]), k)[:, :, 0].mean(1)[:, num_prefix_tokens:]  # (B, N)
    keep_idx = scores.topk(num_keep, dim=1).indices  # (B, K)
    prefix = torch.arange(num_prefix_tokens, device=x.device).expand(B, -1)
    rows = torch.cat([prefix, keep_idx + num_prefix_tokens], dim=1)  # (B, P + K) token positions kept
    x, h = (t.gather(1, rows.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in (x, h))
    q = attn.q_norm(q.gather(2, rows[:, None, :, None].expand(-1, attn.num_heads, -1, q.shape[-1])))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, rows.shape[1], attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(out))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def cls_attention(attn: torch.nn.Module, qkv: torch.Tensor, full: bool = False) -> torch.Tensor:
    """The softmax attention of a timm `Attention` module, rebuilt from its qkv projection output.

    timm's fused attention never materialises the matrix; scoring needs only the class token's
    row, which costs one (1 x T) product per head.

    Args:
        qkv: (B, T, 3 * D) output of `attn.qkv`.
        full: return every row, not only the class token's.
    Returns:
        (B, H, T) class-token rows, or (B, H, T, T) when `full`.
    """
    q, k, _ = split_heads(attn, qkv)
    if not full:
        q = q[:, :, :1]  # the class token's query only: (B, H, 1, hd)
    weights = attention_weights(attn, attn.q_norm(q), attn.k_norm(k))
    return weights if full else weights[:, :, 0]


def split_heads(attn: torch.nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3 * D) qkv projection output -> q, k, v, each (B, H, T, head dim), not yet normed."""
    B, T, _ = qkv.shape
    return qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def attention_weights(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, H, Tq, T) of normed queries over normed keys, in fp32."""
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)


def make_token_gathering_(model: VisionTransformer) -> TokenGatherViT:
    """Turn a timm VisionTransformer into a TokenGatherViT in place (weights untouched)."""
    if type(model) is not VisionTransformer and not isinstance(model, TokenGatherViT):
        raise LotusError(
            f"{type(model).__name__} is not a plain timm VisionTransformer: LOTUS supports the "
            "vit_* / deit_* (non-distilled) families; pick one with --model"
        )
    model.__class__ = TokenGatherViT
    return model


def build_model(cfg: ModelConfig) -> TokenGatherViT:
    """Create the timm model `cfg` describes, as a TokenGatherViT.

    Raises:
        LotusError: unknown or unsupported architecture, bad sizes, unreachable hub weights, or a
            weight file that does not fit the model.
    """
    cfg.check()
    kwargs = dict(
        num_classes=cfg.num_classes,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size or default_patch_size(cfg.img_size),
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    if cfg.pretrained_file is not None:
        return make_token_gathering_(_from_weight_file(cfg.name, cfg.pretrained_file, kwargs))
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not cfg.pretrained:
            raise LotusError(f"cannot build {cfg.name}: {e}") from None
        raise LotusError(
            f"could not load pretrained weights for {cfg.name} (is the model hub reachable?): {_first_problem(e)}; "
            "train a baseline with `lotus train` instead, pass --checkpoint, or --pretrained-path a weight file"
        ) from None
    return make_token_gathering_(model)


def _from_weight_file(name: str, file: str, kwargs: dict[str, Any]) -> VisionTransformer:
    """timm's model `name` started from the weights in `file`, adapted by timm as it adapts its hub
    weights (and as timm's train.py --pretrained-path does): the classifier initialised afresh for
    `num_classes`, the position embeddings resampled to the model's patch grid, the patch
    embedding to its patch size. A file with more blocks than the model gives it its first ones.

    Raises:
        LotusError: the file is not there, timm cannot read it, its weights have other shapes than
            the model's, or it lacks some of them (a file of another family, or with fewer blocks).
    """
    # num_classes=-1: the file's classifier is never the data's; custom_load: an .npz holds Google's
    # JAX layout, which the model's own loader reads (timm reads any other file as a state dict)
    overlay = dict(file=file, num_classes=-1, custom_load=file.endswith(".npz"))
    try:
        with _timm_quiet():
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except FileNotFoundError:
        raise weight_file_missing(file) from None
    except Exception as e:  # whatever timm's readers raise on a file that is not weights of this model
        raise _weights_do_not_fit(file, name, _first_problem(e)) from None
    missing = [] if file.endswith(".npz") else _not_in_file(model, file)  # timm's .npz reader refuses a missing weight itself
    if missing:
        more = f" nor {len(missing) - 1} more of its weights" if len(missing) > 1 else ""
        raise _weights_do_not_fit(file, name, f"it holds no {missing[0]}{more}")
    return model


def _not_in_file(model: VisionTransformer, file: str) -> list[str]:
    """The model's weights, but the classifier, that `file` does not hold under timm's names.

    timm loads a file's tensors by name and leaves the model's others as initialised, without a
    word, so the file is read once more (timm's reader and renames) to tell.
    """
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    held = checkpoint_filter_fn(load_state_dict(file), model, adapt_layer_scale=True)  # adapt: DeiT-3's layer scales
    classifier = model.pretrained_cfg.get("classifier") or "head"
    return [key for key in model.state_dict() if key not in held and key.rsplit(".", 1)[0] != classifier]


def _weights_do_not_fit(file: str, name: str, problem: str) -> LotusError:
    return LotusError(
        f"--pretrained-path {file} does not fit {name}: {problem}; pass timm weights of this architecture, "
        "or the --model (and --depth) they were trained as"
    )


@contextlib.contextmanager
def _timm_quiet() -> Iterator[None]:
    """Hold back timm's log lines while it loads a weight file: the weights it could not load LOTUS
    refuses itself, in one line, and the blocks of a deeper file that are left out are expected."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_problem(e: BaseException) -> str:
    """The line of an exception's message that says what is wrong: torch's load_state_dict opens
    with a header line ('Error(s) in loading state_dict for ...:'), then one line per problem."""
    if isinstance(e.__cause__, pickle.UnpicklingError):  # timm's reader loads tensors only, never pickled objects
        return "torch reads no plain tensors from it (a damaged file, or pickled objects, which are never unpickled)"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else type(e).__name__
    return line.rstrip(".")


def check_weights_fit(cfg: ModelConfig) -> None:
    """Refuse `cfg`'s weight file unless its weights fit the model, before any work: the file is
    loaded as `build_model` loads it, into a model on the meta device (shapes without values), so
    nothing is initialised and the file's tensors are dropped once compared."""
    with torch.device("meta"), warnings.catch_warnings():
        # each copy onto the meta device is a no-op, and torch says so once per weight
        warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter.*")
        build_model(cfg)


def pretrained_source(cfg: ModelConfig, model: VisionTransformer) -> dict[str, Any] | None:
    """Where a model built by `build_model(cfg)` got its weights, as its checkpoint records them:
    timm's hub weights by name, a weight file with its sha256, or None (randomly initialised)."""
    if not cfg.pretrained:
        return None
    if cfg.pretrained_file is None:
        tag = model.pretrained_cfg.get("tag")
        return {"source": "hub", "weights": ".".join(filter(None, (model.pretrained_cfg.get("architecture"), tag)))}
    digest = hashlib.sha256()
    with open(cfg.pretrained_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"source": "file", "file": cfg.pretrained_file, "sha256": digest.hexdigest()}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def structure_of(model: torch.nn.Module) -> dict[str, list[int]]:
    """Per-block widths: {"num_heads": [...], "mlp_hidden": [...]}, as saved in checkpoints."""
    return {"num_heads": [b.attn.num_heads for b in model.blocks], "mlp_hidden": [b.mlp.fc2.in_features for b in model.blocks]}


def check_resizable(i: int, blk: torch.nn.Module) -> None:
    """Refuse block `i` unless its heads and MLP neurons can be removed: timm's plain Attention
    (with `attn_dim`) and plain Mlp."""
    attn, mlp = blk.attn, blk.mlp
    if not hasattr(attn, "attn_dim"):  # older timm reshaped the heads' output to the input width
        raise LotusError(
            "structured pruning needs a newer timm, whose Attention has attn_dim (tested with 1.0.31): pip install -U timm"
        )
    if type(attn) is not Attention or not isinstance(attn.norm, torch.nn.Identity) or getattr(attn, "gate", None) is not None:
        raise LotusError(f"block {i}: structured pruning supports timm's plain Attention (no scale norm, no gate)")
    if type(mlp) is not Mlp or not isinstance(mlp.norm, torch.nn.Identity):
        raise LotusError(f"block {i}: structured pruning supports timm's plain Mlp (not GLU variants, no scale norm)")


def _new_linear(old: torch.nn.Linear, in_features: int, out_features: int) -> torch.nn.Linear:
    return torch.nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


def resize_block_(blk: torch.nn.Module, num_heads: int, mlp_hidden: int) -> torch.nn.Module:
    """Give a block `num_heads` attention heads and `mlp_hidden` MLP neurons, in place: its qkv,
    proj, fc1 and fc2 become new Linears of those widths (freshly initialised; the head size and
    the embedding width stay)."""
    attn, mlp = blk.attn, blk.mlp
    attn.num_heads, attn.attn_dim = num_heads, num_heads * attn.head_dim
    attn.qkv = _new_linear(attn.qkv, attn.qkv.in_features, 3 * attn.attn_dim)
    attn.proj = _new_linear(attn.proj, attn.attn_dim, attn.proj.out_features)
    mlp.fc1 = _new_linear(mlp.fc1, mlp.fc1.in_features, mlp_hidden)
    mlp.fc2 = _new_linear(mlp.fc2, mlp_hidden, mlp.fc2.out_features)
    return blk


def reshape_(model: torch.nn.Module, structure: dict[str, list[int]]) -> torch.nn.Module:
    """Give a freshly built model the block widths `structure` records (weights to be loaded)."""
    heads, hidden = structure["num_heads"], structure["mlp_hidden"]
    if len(heads) != len(model.blocks) or len(hidden) != len(model.blocks):
        raise LotusError(f"checkpoint structure lists {len(heads)} blocks, the model has {len(model.blocks)}")
    for i, (blk, num_heads, mlp_hidden) in enumerate(zip(model.blocks, heads, hidden)):
        check_resizable(i, blk)
        if not (0 < num_heads <= blk.attn.num_heads and 0 < mlp_hidden <= blk.mlp.fc2.in_features):
            raise LotusError(f"block {i}: the structure names heads or neurons the model does not have")
        resize_block_(blk, num_heads, mlp_hidden)
    return model
