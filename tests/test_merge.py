"""Token merging (ToMe): the matching, the size-weighted merge, proportional attention, the
class token's protection, the model's own logits when nothing merges, and the ONNX graph."""

import numpy as np
import pytest
import timm
import torch

from lotus import LotusError
from lotus.export import export_merging
from lotus.merge import (
    bipartite_soft_matching,
    forward_merging,
    merge_patches,
    merge_schedule,
    merge_tokens,
    proportional_attention,
)
from lotus.runtime import ort_session
from lotus.vit import build_model, make_token_gathering_


def one_hot_keys(n: int, dim: int = 8) -> torch.Tensor:
    """(1, n, dim) mutually orthogonal keys, so that any two tokens have cosine 0."""
    return torch.eye(dim)[:n].unsqueeze(0)


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2, "qkv_bias": False}])
def test_no_merge_gives_the_models_own_logits(extra):
    model = make_token_gathering_(
        timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, num_classes=10, **extra)
    ).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        assert (forward_merging(model, x, 0) - expected).abs().max() <= 1e-5
        assert (forward_merging(model, x, 3) - expected).abs().max() > 1e-3  # merging does change the logits


@pytest.mark.parametrize("merge_per_block, expected_merges", [(3, [3, 3]), (8, [8, 4])])
def test_each_block_removes_merge_per_block_tokens(tiny_cfg, merge_per_block, expected_merges):
    model = build_model(tiny_cfg).eval()
    into_attention, into_mlp = [], []
    for blk in model.blocks:
        blk.attn.qkv.register_forward_pre_hook(lambda mod, args: into_attention.append(args[0].shape[1]))
        blk.mlp.register_forward_pre_hook(lambda mod, args: into_mlp.append(args[0].shape[1]))
    with torch.no_grad():
        assert forward_merging(model, torch.randn(2, 3, 16, 16), merge_per_block).shape == (2, 10)
    assert merge_schedule(16, 2, merge_per_block) == expected_merges
    assert [a - m for a, m in zip(into_attention, into_mlp)] == expected_merges  # merged between attention and MLP
    assert into_attention[1:] == into_mlp[:-1]  # the next block sees the merged tokens
    assert into_attention[0] == 1 + 16


def test_the_most_similar_pair_merges_first():
    # set A = tokens 0, 2, 4, set B = 1, 3, 5; token 2 is a copy of token 5, all else orthogonal
    keys = one_hot_keys(6)
    keys[0, 2] = keys[0, 5]
    kept_idx, src_idx, dst_idx = bipartite_soft_matching(keys, 1)
    assert src_idx.tolist() == [[1]] and dst_idx.tolist() == [[2]]  # A's token 1 (token 2) into B's token 2 (token 5)
    assert sorted(kept_idx[0].tolist()) == [0, 2]

    x = torch.randn(1, 6, 4)
    merged, size = merge_tokens(x, torch.ones(1, 6, 1), (kept_idx, src_idx, dst_idx))
    assert merged.shape == (1, 5, 4) and size.sum() == 6
    assert torch.allclose(merged[0, -1], (x[0, 2] + x[0, 5]) / 2)  # B's last token absorbed token 2
    assert torch.equal(merged[0, 2:4], x[0, [1, 3]])  # the other B tokens are as they were


def test_merged_token_is_the_size_weighted_average():
    x = torch.tensor([[[1.0, 0.0], [0.0, 4.0]]])  # token 0 (A) of size 1, token 1 (B) of size 3
    size = torch.tensor([[[1.0], [3.0]]])
    merged, merged_size = merge_tokens(x, size, bipartite_soft_matching(one_hot_keys(1).expand(1, 2, -1), 1))
    assert merged_size.tolist() == [[[4.0]]]
    assert torch.allclose(merged, torch.tensor([[[0.25, 3.0]]]))  # (1 * [1, 0] + 3 * [0, 4]) / 4


def test_a_token_of_size_s_is_attended_as_s_copies():
    torch.manual_seed(0)
    attn = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1).blocks[0].attn.eval()
    a, b = torch.randn(2, 1, 192).unbind(0)
    with torch.no_grad():
        copies, copies_keys = proportional_attention(attn, torch.cat([a, b, b, b]).unsqueeze(0), None)
        sized, sized_keys = proportional_attention(attn, torch.cat([a, b]).unsqueeze(0), torch.tensor([[[1.0], [3.0]]]))
        unsized, _ = proportional_attention(attn, torch.cat([a, b]).unsqueeze(0), None)
    assert torch.allclose(sized, copies[:, :2], atol=1e-5)  # a's and b's outputs, as with b three times
    # the same keys, up to the rounding of a product over 2 rows rather than 4
    assert torch.allclose(sized_keys, copies_keys[:, :2], atol=1e-6)
    assert not torch.allclose(unsized, copies[:, :2], atol=1e-3)  # without log(size) b counts once


def test_class_token_is_never_merged():
    # the class token's key is a copy of a patch token's: the best pair there is, yet it stays
    x, size, keys = torch.randn(1, 7, 4), torch.ones(1, 7, 1), one_hot_keys(7)
    keys[0, 0] = keys[0, 2]
    merged, merged_size = merge_patches(x, size, keys, num_merge=2, num_prefix_tokens=1)
    assert merged.shape == (1, 5, 4) and merged_size.sum() == 7
    assert torch.equal(merged[0, 0], x[0, 0]) and merged_size[0, 0].item() == 1.0
    assert not any(torch.allclose(token, x[0, 0]) for token in merged[0, 1:])


def test_average_pooled_models_are_refused():
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, global_pool="avg", class_token=False)
    with pytest.raises(LotusError, match="class-token model"):
        forward_merging(model, torch.randn(1, 3, 16, 16), 2)


def test_onnx_runtime_matches_pytorch(tiny_cfg, tmp_path):
    model = build_model(tiny_cfg).eval()
    path = export_merging(model, 3, tmp_path / "tome.onnx")
    session = ort_session(path, threads=1)
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = forward_merging(model, x, 3).numpy()
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-4
    assert session.get_modelmeta().custom_metadata_map["merge_per_block"] == "3"
