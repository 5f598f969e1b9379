"""Pruning masks: exact sparsity, merges, the knee, masks that hold, and round trips."""

import pytest
import torch

from lotus import LotusError
from lotus.checkpoint import load_model, save_model
from lotus.data import DataConfig
from lotus.masks import (
    enforce_masks_,
    essential_sparsity,
    magnitude_masks,
    mask_sparsity,
    merge_masks,
    prunable_names,
    sparsity_report,
)
from lotus.prune import exact_sparsity
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig, build_model


def test_prunable_weights_are_the_block_linears(tiny_cfg):
    model = build_model(tiny_cfg)
    names = prunable_names(model)
    assert len(names) == 2 * 4
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in names)
    assert {n.split(".", 2)[2] for n in names} == {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
    assert prunable_names(model, ["head", "patch_embed"])[-2:] == ["head.weight", "patch_embed.proj.weight"]
    with pytest.raises(LotusError, match="cannot prune 'norm'"):
        prunable_names(model, ["norm"])


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.013, 0.3, 0.77])
def test_achieved_sparsity_is_the_requested_one(tiny_cfg, scope, sparsity):
    model = build_model(tiny_cfg)
    names = prunable_names(model)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in names}
    masks = magnitude_masks(weights, sparsity, scope=scope)
    total = sum(w.numel() for w in weights.values())
    if scope == "global":  # within one weight overall
        assert abs(sum(int((~m).sum()) for m in masks.values()) - sparsity * total) <= 1
    else:  # within one weight in every layer
        assert all(abs(int((~masks[n]).sum()) - sparsity * w.numel()) <= 1 for n, w in weights.items())
    if sparsity > 0:  # every pruned weight is no larger than every kept one
        pruned_max = max(w[~masks[n]].abs().max() for n, w in weights.items() if (~masks[n]).any())
        kept_min = min(w[masks[n]].abs().min() for n, w in weights.items()) if scope == "global" else None
        assert kept_min is None or pruned_max <= kept_min


def test_further_pruning_keeps_what_was_pruned():
    w = {"a": torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0])}
    first = magnitude_masks(w, 1 / 3)
    assert first["a"].tolist() == [True, True, False, True, False, True]
    w2 = {"a": torch.tensor([0.05, -3.0, 9.0, 2.0, -0.2, 1.0])}  # a pruned weight grew: stays pruned
    second = magnitude_masks(w2, 0.5, keep=first)
    assert second["a"].tolist() == [False, True, False, True, False, True]


def test_merge_rules_on_constructed_masks():
    a = {"w": torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)}
    b = {"w": torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)}
    c = {"w": torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool)}
    assert merge_masks([a, b, c], "union")["w"].tolist() == [True, True, True, False, True]
    assert merge_masks([a, b, c], "intersection")["w"].tolist() == [True, False, False, False, False]
    assert merge_masks([a, b, c], "vote", min_votes=2)["w"].tolist() == [True, False, False, False, True]
    with pytest.raises(LotusError, match="vote threshold"):
        merge_masks([a, b], "vote")
    with pytest.raises(LotusError, match="not one of"):
        merge_masks([a, b], "average")


def test_nested_masks_union_denoises_nothing(tiny_cfg):
    # The source method's variant: masks of one weight set at several sparsities are nested,
    # so their union is just the least sparse one.
    w = {"w": torch.randn(1000)}
    levels = [magnitude_masks(w, s) for s in (0.2, 0.35, 0.5)]
    assert torch.equal(merge_masks(levels, "union")["w"], levels[0]["w"])
    assert mask_sparsity(merge_masks(levels, "union")) == pytest.approx(0.2)


def test_exact_sparsity_cuts_a_union_to_the_target():
    torch.manual_seed(0)
    proposals = [{"w": torch.rand(100) > 0.5} for _ in range(3)]
    weights = [{"w": torch.randn(100)} for _ in range(3)]
    union = merge_masks(proposals, "union")
    exact = exact_sparsity(union, proposals, weights, 0.6)
    assert int((~exact["w"]).sum()) == 60
    assert not (exact["w"] & ~union["w"]).any()  # only weights the union kept survive


def test_knee_on_constructed_curves():
    s = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert essential_sparsity(s, [80.0, 80.1, 79.8, 79.3, 78.5, 75.0, 60.0], 80.0, tolerance=1.0) == 0.2
    assert essential_sparsity(s, [80.0, 80.1, 79.8, 79.3, 79.1, 79.0, 60.0], 80.0, tolerance=1.0) == 0.4
    # a noisy recovery after the first fall does not move the knee
    assert essential_sparsity(s, [80.0, 78.0, 79.8, 79.9, 79.5, 70.0, 60.0], 80.0, tolerance=1.0) == 0.01
    assert essential_sparsity(s, [70.0] * 7, 80.0, tolerance=1.0) == 0.0
    assert essential_sparsity(s[::-1], [60.0, 75.0, 78.5, 79.3, 79.8, 80.1, 80.0], 80.0) == 0.2  # order-free


def test_masked_weights_stay_exactly_zero_through_training(tiny_cfg):
    model = build_model(tiny_cfg)
    names = prunable_names(model)
    masks = magnitude_masks({n: p.detach() for n, p in model.named_parameters() if n in names}, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    enforcer = enforce_masks_(model, masks)
    for _ in range(5):
        loss = model(torch.randn(8, 3, 16, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        enforcer.after_step(opt)
    params = dict(model.named_parameters())
    for n in names:
        assert (params[n][~masks[n]] == 0).all()
        assert (opt.state[params[n]]["exp_avg"][~masks[n]] == 0).all()  # no momentum to revive them
        assert (params[n][masks[n]] != 0).float().mean() > 0.99  # the kept weights trained
    assert sparsity_report(model, names)["overall"] == pytest.approx(0.5, abs=1e-6)


def test_masks_round_trip_and_hold_through_finetuning(tmp_path):
    base = tmp_path / "base"
    train(DataConfig("digits", img_size=16), ModelConfig(depth=1), TrainConfig(epochs=1, batch_size=64), base)
    model, meta = load_model(base)
    names = prunable_names(model)
    masks = magnitude_masks({n: p.detach() for n, p in model.named_parameters() if n in names}, 0.4)
    from lotus.masks import apply_masks_

    apply_masks_(model, masks)
    save_model(tmp_path / "pruned", model, ModelConfig(**meta["model"]), meta["preprocess"], masks)
    loaded, loaded_meta = load_model(tmp_path / "pruned")
    assert loaded_meta["masks"].keys() == masks.keys()
    assert all(torch.equal(loaded_meta["masks"][n], masks[n]) for n in names)

    # fine-tuning a pruned checkpoint keeps its masks (and resumable state carries them)
    train(
        DataConfig("digits", img_size=16),
        ModelConfig(),
        TrainConfig(epochs=2, batch_size=64),
        tmp_path / "ft",
        init_checkpoint=tmp_path / "pruned",
    )
    tuned, tuned_meta = load_model(tmp_path / "ft")
    params = dict(tuned.named_parameters())
    assert all((params[n][~masks[n]] == 0).all() for n in names)
    assert sparsity_report(tuned, names)["overall"] == pytest.approx(0.4, abs=1e-5)


def test_loading_refuses_masks_that_do_not_hold(tmp_path, tiny_cfg):
    model = build_model(tiny_cfg)
    names = prunable_names(model)
    masks = magnitude_masks({n: p.detach() for n, p in model.named_parameters() if n in names}, 0.5)
    save_model(tmp_path / "m", model, tiny_cfg, {}, masks)  # weights were never zeroed
    with pytest.raises(LotusError, match="pruned weights of .* are not zero"):
        load_model(tmp_path / "m")


def test_two_four_masks_keep_exactly_two_in_every_group_of_four(tiny_cfg):
    from lotus.masks import semi_structured_masks

    model = build_model(tiny_cfg)
    names = prunable_names(model)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in names}
    masks = semi_structured_masks(weights)
    for name, w in weights.items():
        groups = masks[name].reshape(-1, 4)
        assert (groups.sum(1) == 2).all()
        kept_min = w.abs().reshape(-1, 4).masked_fill(~groups, float("inf")).min(1).values
        pruned_max = w.abs().reshape(-1, 4).masked_fill(groups, -1).max(1).values
        assert (pruned_max <= kept_min).all()  # the two largest of each group are kept
    assert mask_sparsity(masks) == pytest.approx(0.5)
    from lotus.masks import holds_pattern

    assert all(holds_pattern(w * masks[n]) and not holds_pattern(w) for n, w in weights.items())
    with pytest.raises(LotusError, match="not a multiple of 4"):
        semi_structured_masks({"w": torch.randn(3, 6)})
