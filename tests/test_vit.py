"""The token-gathering forward against timm's own, and the errors users get when building models."""

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lotus import LotusError
from lotus.vit import (
    ModelConfig,
    TokenGatherViT,
    build_model,
    cls_attention,
    gather_tokens,
    make_token_gathering_,
)


def timm_reference(model: TokenGatherViT) -> VisionTransformer:
    ref = copy.deepcopy(model)
    ref.__class__ = VisionTransformer  # timm's own forward, same weights
    return ref


@pytest.mark.parametrize("extra", [{}, {"no_embed_class": True, "reg_tokens": 2}, {"global_pool": "avg", "class_token": False}])
def test_all_patches_kept_matches_timm(tiny_cfg, extra):
    model = make_token_gathering_(
        timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, num_classes=10, **extra)
    ).eval()
    x = torch.randn(3, 3, 16, 16)
    keep_all = torch.arange(16).expand(3, -1)
    with torch.no_grad():
        expected = timm_reference(model)(x)
        assert (model(x) - expected).abs().max() <= 1e-5
        assert (model(x, keep_all) - expected).abs().max() <= 1e-5


def test_patch_order_does_not_matter(tiny_cfg):
    # Positional embeddings are added before gathering, so a permutation of the kept patches is
    # the same set of tokens: the class token's output must not change.
    model = build_model(tiny_cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 3, 5, 9, 15], [2, 4, 6, 8, 10]])
    shuffled = keep[:, torch.randperm(5)]
    with torch.no_grad():
        assert torch.allclose(model(x, keep), model(x, shuffled), atol=1e-5)
        assert not torch.allclose(model(x, keep), model(x), atol=1e-3)


def test_blocks_see_only_kept_tokens(tiny_cfg):
    model = build_model(tiny_cfg)
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    keep = torch.stack([torch.randperm(16)[:7] for _ in range(4)])
    model(torch.randn(4, 3, 16, 16), keep).sum().backward()
    assert seen == [(4, 1 + 7, 192)] * 2  # class token + 7 patches, in every block


@pytest.mark.parametrize("qk_norm", [False, True])
def test_select_block_computes_the_kept_tokens_only_and_gives_what_the_whole_block_would(qk_norm):
    # The select block scores every patch, so its keys and values see every token; its queries,
    # projection and MLP are per token, so running them on the kept tokens alone must change no
    # logit, only the cost. With qk-norm, the keys are normed once, for scoring and attending both.
    model = make_token_gathering_(
        timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, num_classes=10, qk_norm=qk_norm)
    ).eval()
    x, keep = torch.randn(3, 3, 16, 16), 5
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, []).append(tuple(args[0].shape))

        return hook

    attn = model.blocks[1].attn
    for name, module in (("qkv", attn.qkv), ("k_norm", attn.k_norm), ("proj", attn.proj), ("mlp", model.blocks[1].mlp)):
        module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        tokens = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        chooser = model.blocks[1]
        scores = cls_attention(chooser.attn, chooser.attn.qkv(chooser.norm1(tokens))).mean(1)[:, 1:]
        whole = gather_tokens(chooser(tokens), scores.topk(keep, dim=1).indices, num_prefix_tokens=1)
        expected = model.forward_head(model.norm(whole))  # the whole block run, then cut
        shapes.clear()
        got = model.forward_dropping(x, keep, select_block=1)
    assert (got - expected).abs().max() <= 1e-5
    assert shapes == {
        "qkv": [(3, 1 + 16, 192)],
        "k_norm": [(3, 3, 1 + 16, 64)],
        "proj": [(3, 1 + keep, 192)],
        "mlp": [(3, 1 + keep, 192)],
    }


def test_gather_tokens_picks_the_named_patches():
    x = torch.arange(2 * 5 * 1).float().view(2, 5, 1)  # 1 prefix token + 4 patches
    out = gather_tokens(x, torch.tensor([[3, 0], [1, 2]]), num_prefix_tokens=1)
    assert out.squeeze(-1).tolist() == [[0, 4, 1], [5, 7, 8]]


def test_build_model_shapes(tiny_cfg):
    model = build_model(tiny_cfg)
    assert isinstance(model, TokenGatherViT)
    assert model.patch_embed.num_patches == tiny_cfg.num_patches == 16
    assert len(model.blocks) == 2
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ModelConfig(name="resnet18"), "not a timm VisionTransformer"),
        (ModelConfig(name="no_such_vit"), "unknown timm model"),
        (ModelConfig(name="deit_tiny_distilled_patch16_224"), "not a plain timm VisionTransformer"),
        (ModelConfig(img_size=30, patch_size=4), "not a multiple"),
        (ModelConfig(img_size=32, patch_size=4, pretrained=True), "pretrained weights"),
    ],
)
def test_unsupported_models_fail_clearly(cfg, message):
    with pytest.raises(LotusError, match=message):
        build_model(cfg)
