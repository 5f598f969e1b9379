"""Data lottery tickets: the score corrections, exact K, fingerprints, and training on kept patches."""

import json
from dataclasses import asdict

import pytest
import torch

from lotus import LotusError
from lotus.data import AugmentConfig, Batch, BatchLoader, DataConfig, ImageData, augment_batch, load_split
from lotus.drop import num_keep
from lotus.tickets import (
    TicketConfig,
    Tickets,
    attention_rollout,
    balance_scores,
    correct_cls_sink,
    fill_from_neighbours,
    gradient_rollout,
    keep_from_scores,
    load_tickets,
    make_tickets,
    norm_outliers,
    parse_layers,
    recut_tickets,
    sample_keys,
    save_tickets,
    score_batch,
    select_keep,
    transport_scores,
)
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig, build_model, gather_tokens


def test_cls_sink_is_replaced_by_the_mean_of_the_other_entries():
    row = torch.tensor([0.90, 0.06, 0.02, 0.02])  # the class token attends mostly to itself
    fixed = correct_cls_sink(row)
    other_mean = (0.06 + 0.02 + 0.02) / 3
    expected = torch.tensor([other_mean, 0.06, 0.02, 0.02]) / (other_mean + 0.10)
    assert torch.allclose(fixed, expected) and fixed.sum() == pytest.approx(1.0)
    # on a full map only the class-token row changes
    full = torch.softmax(torch.randn(2, 4, 4), -1)
    out = correct_cls_sink(full)
    assert torch.allclose(out[:, 1:], full[:, 1:])
    assert torch.allclose(out[:, 0, 0], full[:, 0, 1:].mean(-1) / (full[:, 0, 1:].mean(-1) + full[:, 0, 1:].sum(-1)))


def test_rollout_of_identity_maps_is_identity_and_of_uniform_is_uniform():
    eye = torch.eye(5).expand(2, 5, 5)
    assert torch.allclose(attention_rollout([eye, eye]), eye)
    uniform = torch.full((1, 4, 4), 0.25)
    out = attention_rollout([uniform] * 3)
    assert torch.allclose(out.sum(-1), torch.ones(1, 4))  # rows stay distributions
    # one layer: 0.5 * (A + I) after row normalisation
    assert torch.allclose(attention_rollout([uniform]), 0.5 * (uniform + torch.eye(4)))


def test_high_norm_outliers_take_their_neighbours_mean():
    grid = 4
    norms = torch.full((1, 16), 10.0) + torch.linspace(0, 1, 16)
    norms[0, 5] = 60.0  # a register-like token: six times the others
    outliers = norm_outliers(norms, z=3.5, ratio=2.0)
    assert outliers.nonzero().tolist() == [[0, 5]]
    scores = torch.arange(16.0).view(1, 16)
    scores[0, 5] = 100.0  # it soaked up attention
    fixed = fill_from_neighbours(scores, outliers, grid)
    neighbours = [0, 1, 2, 4, 6, 8, 9, 10]  # the 8 cells around (1, 1)
    assert fixed[0, 5] == pytest.approx(torch.tensor(neighbours).float().mean().item())
    assert torch.equal(fixed[0, torch.arange(16) != 5], scores[0, torch.arange(16) != 5])


def test_uniform_background_is_not_an_outlier():
    norms = torch.full((1, 16), 10.0)
    norms[0, :3] = 10.5  # small differences on near-constant background give huge z-scores
    assert not norm_outliers(norms, z=3.5, ratio=2.0).any()


def test_keep_exactly_k_highest():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8], [0.5, 0.4, 0.7, 0.6]])
    assert keep_from_scores(scores, 2).tolist() == [[1, 3], [2, 3]]
    assert num_keep(64, 0.1) == 58 and num_keep(64, 0.5) == 32 and num_keep(16, 0.0) == 16
    assert num_keep(16, 0.99) == 1  # at least one patch stays
    with pytest.raises(LotusError, match="outside"):
        TicketConfig(drop=1.0)


def test_scores_move_with_the_augmentation():
    grid, patch = 4, 4
    scores = torch.arange(16.0).view(1, 16)
    # content moved one patch down and right: the score of old (r, c) is now at (r + 1, c + 1)
    moved = transport_scores(scores, grid, patch, torch.tensor([[4, 4]]), torch.tensor([False])).view(4, 4)
    assert moved[1:, 1:].equal(scores.view(4, 4)[:-1, :-1])
    assert torch.isinf(moved[0]).all() and torch.isinf(moved[:, 0]).all()
    # a 1px shift rounds to no shift; a flip mirrors the columns
    flipped = transport_scores(scores, grid, patch, torch.tensor([[1, -1]]), torch.tensor([True])).view(4, 4)
    assert flipped.equal(scores.view(4, 4).flip(-1))


def test_kept_patch_follows_the_content_through_the_real_augmentation():
    """One bright patch per image, scored highest; after augment_batch's crop and flip, the one
    patch kept must hold (most of) the bright block, wherever the augmentation moved it."""
    gen = torch.Generator().manual_seed(0)
    B, grid, patch = 256, 4, 4
    where = torch.randint(0, grid * grid, (B,), generator=gen)
    images = torch.zeros(B, 3, 16, 16, dtype=torch.uint8)
    for i, w in enumerate(where.tolist()):
        r, c = divmod(w, grid)
        images[i, 0, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 255
    scores = torch.full((B, grid * grid), 0.1)
    scores[torch.arange(B), where] = 1.0
    tickets = Tickets(keep_from_scores(scores, 1), scores, grid, patch, {"config": {"select": "attention"}})
    augmented, shift, flip = augment_batch(images, AugmentConfig(padding=4, hflip=True), gen)
    keep = tickets.for_batch(Batch(augmented.float(), torch.zeros(B, dtype=torch.long), torch.arange(B), shift, flip))
    bright = (augmented[:, 0] > 0).float().view(B, grid, patch, grid, patch).sum((2, 4)).view(B, -1)  # bright pixels per patch
    visible = bright.sum(-1) >= 8  # the crop did not push the block (mostly) out of the image
    kept = bright[torch.arange(B), keep[:, 0]]
    assert visible.sum() > B // 2 and flip.any() and (shift != 0).any()
    assert (kept[visible] >= 4).all()  # the kept patch holds at least a quarter of the block...
    assert (kept[visible] == bright[visible].max(-1).values).float().mean() > 0.9  # ...and almost always its largest share


def test_spread_keeps_the_best_of_every_block_first():
    # 4x4 grid, attention concentrated in the top-left 2x2 block
    scores = torch.tensor([[9.0, 8.0, 1.0, 1.5], [7.0, 6.0, 1.2, 1.1], [0.5, 0.4, 0.3, 0.2], [0.6, 0.1, 0.05, 0.01]]).view(1, 16)
    assert select_keep(scores, 4, grid=4).tolist() == [[0, 1, 4, 5]]  # the plain top 4: one corner
    assert select_keep(scores, 4, grid=4, spread=2).tolist() == [[0, 3, 10, 12]]  # the best of each block
    assert select_keep(scores, 6, grid=4, spread=2).tolist() == [[0, 1, 3, 6, 10, 12]]  # then the best second-bests
    moved = scores.clone()
    moved[0, [0, 1, 4, 5]] = float("-inf")  # a block pushed out by the crop gives nothing
    assert select_keep(moved, 4, grid=4, spread=2).tolist() == [[3, 6, 10, 12]]
    with pytest.raises(LotusError, match="at least 1"):
        TicketConfig(spread=0)


def test_balance_keeps_every_position_equally_often_and_what_an_image_attends_unusually():
    # 2000 images on a 4x4 grid whose attention piles on the centre, as a trained ViT's does
    gen = torch.Generator().manual_seed(0)
    centre = torch.zeros(4, 4)
    centre[1:3, 1:3] = 2.0
    scores = (centre.view(1, 16) + torch.rand(2000, 16, generator=gen)).softmax(-1)
    plain = Tickets(
        keep_from_scores(scores, 8), scores, 4, 4, {"config": asdict(TicketConfig(drop=0.5, select="attention")), "num_keep": 8}
    )
    balanced = recut_tickets(plain, TicketConfig(select="attention", drop=0.5, balance=True))

    def kept_share(keep):
        return torch.bincount(keep.flatten(), minlength=16).float() / len(keep)

    assert kept_share(plain.keep_idx).min() < 0.4 and kept_share(plain.keep_idx).max() == 1.0  # corners rarely, centre always
    assert torch.allclose(kept_share(balanced.keep_idx), torch.full((16,), 0.5), atol=0.04)  # every position about half the time
    assert balanced.keep_idx.shape == (2000, 8)
    assert torch.equal(balanced.scores, scores)  # the scores stay attention (heat maps, fused-token weights)
    batch = Batch(
        torch.zeros(2000, 1, 16, 16),
        torch.zeros(2000, dtype=torch.long),
        torch.arange(2000),
        torch.zeros(2000, 2, dtype=torch.long),
        torch.zeros(2000, dtype=torch.bool),
    )
    assert torch.equal(balanced.for_batch(batch), balanced.keep_idx)  # an unmoved crop keeps the balanced tickets
    with pytest.raises(LotusError, match="--balance set how attention scores patches, but these tickets are random"):
        TicketConfig(select="random", balance=True)
    # the key is a patch's rank at its position: image 1 attends its patch 1 more than its patch 0,
    # yet less than any other image attends patch 1 and more than any other attends patch 0
    three = torch.tensor([[0.1, 0.9], [0.3, 0.5], [0.2, 0.8]])
    assert torch.allclose(balance_scores(three), torch.tensor([[1 / 3, 1.0], [1.0, 1 / 3], [2 / 3, 2 / 3]]))
    assert keep_from_scores(three, 1)[1].item() == 1 and keep_from_scores(balance_scores(three), 1)[1].item() == 0


def test_spread_must_divide_the_grid(tiny_cfg):
    data, model, mean, std = _digits_and_model(tiny_cfg)  # a 4x4 grid
    with pytest.raises(LotusError, match="does not divide the 4x4 patch grid"):
        make_tickets(model, data, mean, std, TicketConfig(spread=3))
    tickets = make_tickets(model, data, mean, std, TicketConfig(drop=0.5, spread=2))
    blocks = (tickets.keep_idx // 4 // 2) * 2 + (tickets.keep_idx % 4) // 2  # block of each kept patch
    assert all(sorted(torch.bincount(row, minlength=4).tolist()) == [2, 2, 2, 2] for row in blocks)  # 8 kept: 2 per block


def test_sampled_keys_draw_each_patch_with_weight_score_to_the_one_over_t():
    torch.manual_seed(0)
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(40_000, 4)
    for t, weights in [(1.0, [0.1, 0.2, 0.3, 0.4]), (0.5, [0.01, 0.04, 0.09, 0.16])]:
        picked = keep_from_scores(sample_keys(scores, t), 1).flatten()
        freq = torch.bincount(picked, minlength=4).float() / len(picked)
        expected = torch.tensor(weights) / sum(weights)
        assert (freq - expected).abs().max() < 0.01, (t, freq, expected)
    # a cold draw is the fixed top-K; patches moved in from the padding (-inf) are never drawn first
    assert keep_from_scores(sample_keys(scores[:100], 0.01), 2).eq(torch.tensor([2, 3])).all()
    padded = torch.tensor([[float("-inf"), 0.1, 0.1, float("-inf")]]).expand(1000, 4)
    assert set(keep_from_scores(sample_keys(padded, 1.0), 2).flatten().tolist()) == {1, 2}


@pytest.mark.parametrize("select", ["attention", "random"])
def test_sampled_tickets_redraw_k_patches_in_every_batch(tiny_cfg, select):
    data, model, mean, std = _digits_and_model(tiny_cfg)
    tickets = make_tickets(model, data, mean, std, TicketConfig(drop=0.5, select=select, temperature=1.0))
    tickets.scores[0] = torch.linspace(0.01, 0.16, 16)[torch.randperm(16)]  # patch weights from 1 to 16
    index = torch.zeros(4000, dtype=torch.long)  # one image drawn 4000 times
    batch = Batch(data.images[index].float(), data.labels[index], index, None, None)
    torch.manual_seed(0)
    keep = tickets.for_batch(batch)
    assert keep.shape == (4000, 8) and all(len(set(row.tolist())) == 8 for row in keep)
    assert not keep.eq(keep[0]).all(), "the K patches are drawn afresh, not fixed"
    freq = torch.bincount(keep.flatten(), minlength=16).float() / len(keep)
    if select == "random":  # the control draws uniformly: every patch kept half the time
        assert (freq - 0.5).abs().max() < 0.05
    else:  # attention: kept more often the higher its score
        order = tickets.scores[0].argsort()
        assert freq[order[-4:]].mean() > freq[order[:4]].mean() + 0.4
    torch.manual_seed(0)
    assert tickets.for_batch(batch).equal(keep), "draws follow torch's seed, so a resumed run redraws the same"


def test_attention_scores_come_from_the_real_attention(tiny_cfg):
    # The hook-rebuilt class-token row must equal timm's own attention computed without fusion.
    model = build_model(tiny_cfg).eval()
    x = torch.randn(3, 3, 16, 16)
    rows = {}
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    real_softmax = torch.Tensor.softmax

    def spy(t, dim):
        out = real_softmax(t, dim)
        if out.shape[-1] == 17 and out.dim() == 4:
            rows["attn"] = out
        return out

    torch.Tensor.softmax = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.Tensor.softmax = real_softmax
    expected = rows["attn"][:, :, 0, 1:].mean(1)  # (B, N) class-token row, heads averaged
    scores, _ = score_batch(model, x, TicketConfig(select="attention", layers=(-1,), cls_sink=False, norm_outliers=False))
    assert torch.allclose(scores, expected, atol=1e-6)


def test_layers_all_averages_every_blocks_class_token_row(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    plain = dict(select="attention", cls_sink=False, norm_outliers=False)
    per_block = [score_batch(model, x, TicketConfig(layers=(i,), **plain))[0] for i in range(len(model.blocks))]
    every, _ = score_batch(model, x, TicketConfig(layers=parse_layers("all"), **plain))
    assert len(per_block) > 1 and torch.allclose(every, torch.stack(per_block).mean(0), atol=1e-6)
    assert parse_layers("9,10,11") == (9, 10, 11) and parse_layers(None) is None
    default, _ = score_batch(model, x, TicketConfig(**plain))  # every block, the best attention measured
    assert torch.equal(default, every) and TicketConfig(select="attention", layers=None).layers == "all"
    for bad in ("last", "1,x"):
        with pytest.raises(LotusError, match="--layers"):
            TicketConfig(select="attention", layers=parse_layers(bad))


def _digits_and_model(tiny_cfg):
    data = load_split(DataConfig("digits", img_size=16), "train")
    return data, build_model(tiny_cfg).eval(), *data.channel_stats()


@pytest.mark.parametrize(
    "cfg",
    [
        TicketConfig(drop=0.3),
        TicketConfig(select="attention", drop=0.5, method="rollout"),
        TicketConfig(select="attention", drop=0.5, method="grad"),
        TicketConfig(drop=0.3, select="random"),
    ],
)
def test_every_image_keeps_exactly_k(tiny_cfg, cfg, tmp_path):
    data, model, mean, std = _digits_and_model(tiny_cfg)
    tickets = make_tickets(model, data, mean, std, cfg)
    k = num_keep(16, cfg.drop)
    assert tickets.keep_idx.shape == (len(data), k)
    assert all(len(set(row.tolist())) == k for row in tickets.keep_idx)  # no duplicates
    save_tickets(tickets, tmp_path)
    loaded = load_tickets(tmp_path)
    assert torch.equal(loaded.keep_idx.long(), tickets.keep_idx) and torch.equal(loaded.scores, tickets.scores)
    # augmented batches still get exactly K distinct patches each
    loader = BatchLoader(data, 64, mean, std, shuffle=True, augment=AugmentConfig(padding=4, hflip=True))
    batch = next(loader.epoch(0))
    keep = loaded.for_batch(batch)
    assert keep.shape == (64, k) and all(len(set(r.tolist())) == k for r in keep)


def test_recut_tickets_are_the_tickets_scored_at_that_setting(tiny_cfg, tmp_path):
    data, model, mean, std = _digits_and_model(tiny_cfg)
    scored = make_tickets(model, data, mean, std, TicketConfig(select="attention", drop=0.5, layers=(0, 1)))
    save_tickets(scored, tmp_path)  # the saved config holds layers as a list
    cut = TicketConfig(select="attention", drop=0.25, layers=(0, 1), spread=2, fuse=True)
    loaded = load_tickets(tmp_path)
    recut = recut_tickets(loaded, cut)
    direct = make_tickets(model, data, mean, std, cut)
    assert recut.num_keep == 12 and torch.equal(recut.keep_idx, direct.keep_idx) and torch.equal(recut.scores, direct.scores)
    assert recut.meta["config"] == direct.meta["config"] and recut.fuse
    with pytest.raises(LotusError, match=r"scored with other settings, layers \[0, 1\] \(asked: 'all'\): ask for the same"):
        recut_tickets(loaded, TicketConfig(select="attention", drop=0.25, layers="all"))
    with pytest.raises(LotusError, match="does not divide the 4x4 patch grid"):
        recut_tickets(scored, TicketConfig(select="attention", drop=0.25, layers=(0, 1), spread=3))
    random = make_tickets(model, data, mean, std, TicketConfig(drop=0.5, select="random", seed=1))
    assert torch.equal(
        recut_tickets(random, TicketConfig(drop=0.25, select="random", seed=1)).keep_idx,
        make_tickets(model, data, mean, std, TicketConfig(drop=0.25, select="random", seed=1)).keep_idx,
    )
    with pytest.raises(LotusError, match="seed 1 \\(asked: 0\\)"):
        recut_tickets(random, TicketConfig(drop=0.25, select="random"))


def test_tickets_are_refused_on_other_data(tiny_cfg, tmp_path):
    data, model, mean, std = _digits_and_model(tiny_cfg)
    tickets = make_tickets(model, data, mean, std, TicketConfig(drop=0.25))
    save_tickets(tickets, tmp_path)
    loaded = load_tickets(tmp_path)
    loaded.check(data, grid=4, patch_size=4)  # the data they were made for
    test_split = load_split(DataConfig("digits", img_size=16), "test")
    with pytest.raises(LotusError, match="tickets were made for digits \\(train, 1365 images\\), not digits \\(test"):
        loaded.check(test_split, grid=4, patch_size=4)
    other_holdout = load_split(DataConfig("digits", img_size=16, val_fraction=0.1), "train")  # 1437 less 10%
    with pytest.raises(LotusError, match="not digits \\(train, 1293 images\\): .* the same --val-fraction"):
        loaded.check(other_holdout, grid=4, patch_size=4)
    moved = ImageData(data.images, data.labels, data.classes, "/elsewhere/digits", data.split)  # the same images, another path
    loaded.check(moved, grid=4, patch_size=4)
    altered = ImageData(data.images.clone(), data.labels, data.classes, data.name, data.split)
    altered.images[0, 0, 0, 0] ^= 1  # same name and size, one pixel differs
    with pytest.raises(LotusError, match="tickets were made for"):
        loaded.check(altered, grid=4, patch_size=4)
    with pytest.raises(LotusError, match="4x4 grid of 4px patches, the model has 8x8 of 2px"):
        loaded.check(data, grid=8, patch_size=2)


@pytest.mark.parametrize("fuse", [False, True])
def test_training_on_tickets_feeds_k_tokens_to_the_blocks(tiny_cfg, tmp_path, monkeypatch, fuse):
    data, model, mean, std = _digits_and_model(tiny_cfg)
    save_tickets(make_tickets(model, data, mean, std, TicketConfig(drop=0.5, fuse=fuse)), tmp_path / "tickets")

    seen = []
    import lotus.train as T

    real_build = T.build_model

    def build_and_watch(cfg):
        m = real_build(cfg)
        m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append((mod.training, args[0].shape[1])))
        return m

    monkeypatch.setattr(T, "build_model", build_and_watch)
    history = train(
        DataConfig("digits", img_size=16),
        ModelConfig(depth=1),
        TrainConfig(epochs=1, batch_size=128),
        tmp_path / "run",
        tickets=tmp_path / "tickets",
    )
    train_lengths = {n for training, n in seen if training}
    eval_lengths = {n for training, n in seen if not training}
    assert train_lengths == {1 + 8 + fuse}  # class token + 8 of 16 patches (+ the fused token) in every training step
    assert eval_lengths == {1 + 16}  # evaluation sees whole images
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["tickets"]["num_keep"] == 8 and meta["tickets"]["drop"] == 0.5 and meta["tickets"]["fuse"] == fuse
    assert history[0]["test_accuracy"] >= 0


def test_fused_token_is_the_weighted_sum_of_the_dropped_patch_tokens():
    x = torch.randn(2, 1 + 4, 3)  # class token + 4 patch tokens
    keep = torch.tensor([[0, 2], [1, 3]])
    weights = torch.tensor([[0.0, 0.25, 0.0, 0.75], [0.5, 0.0, 0.5, 0.0]])
    out = gather_tokens(x, keep, 1, weights)
    assert out.shape == (2, 1 + 2 + 1, 3)
    assert torch.equal(out[:, :3], gather_tokens(x, keep, 1))  # the kept tokens are untouched
    assert torch.allclose(out[0, -1], 0.25 * x[0, 2] + 0.75 * x[0, 4])
    assert torch.allclose(out[1, -1], 0.5 * x[1, 1] + 0.5 * x[1, 3])


@pytest.mark.parametrize("select", ["attention", "random"])
def test_fusion_weights_cover_the_dropped_patches_inside_the_image(select):
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1]])
    cfg = TicketConfig(drop=0.5, select=select, fuse=True)
    tickets = Tickets(keep_from_scores(scores, 8), scores, 4, 4, {"config": asdict(cfg)})
    batch = Batch(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long), torch.tensor([0]), None, None)
    keep, weights = tickets.tokens_for_batch(batch)
    assert torch.equal(keep, tickets.for_batch(batch))
    assert torch.all(weights[0, keep[0]] == 0) and weights.sum().item() == pytest.approx(1.0)
    dropped = torch.ones(16, dtype=torch.bool).scatter(0, keep[0], False)
    expected = torch.ones(8) / 8 if select == "random" else scores[0, dropped] / scores[0, dropped].sum()
    assert torch.allclose(weights[0, dropped], expected)
    # shifted one patch down: the top row comes from the padding, is dropped first, and gets no weight
    shifted = Batch(batch.images, batch.labels, batch.index, torch.tensor([[4, 0]]), torch.tensor([False]))
    keep, weights = tickets.tokens_for_batch(shifted)
    assert keep.shape == (1, 8) and torch.all(weights[0, :4] == 0) and weights.sum().item() == pytest.approx(1.0)


def test_tickets_from_the_wrong_split_size_fail_in_train(tiny_cfg, tmp_path):
    data, model, mean, std = _digits_and_model(tiny_cfg)
    save_tickets(make_tickets(model, data, mean, std, TicketConfig(drop=0.5)), tmp_path / "tickets")
    with pytest.raises(LotusError, match="grid"):
        train(
            DataConfig("digits", img_size=16),
            ModelConfig(depth=1, patch_size=2),
            TrainConfig(epochs=1),
            tmp_path / "run",
            tickets=tmp_path / "tickets",
        )


def _rss() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


def test_loaded_tickets_are_read_from_the_file_as_batches_need_them(tmp_path):
    """A large dataset's tickets: loading maps the file, and a batch reads only its rows."""
    n, grid = 20_000, 32  # 20,000 images of 1,024 patches: 82 MB of scores
    scores = torch.rand(n, grid * grid)
    save_tickets(Tickets(keep_from_scores(scores, 16), scores, grid, 4, {"config": {"select": "attention"}}), tmp_path)
    del scores
    before = _rss()
    tickets = load_tickets(tmp_path)
    index = torch.tensor([5, 19_999, 123])
    batch = Batch(torch.zeros(3, 3, 128, 128), torch.zeros(3, dtype=torch.long), index, None, None)
    keep = tickets.for_batch(batch)
    assert _rss() - before < 25e6  # not the 82 MB file
    assert torch.equal(keep, tickets.scores[index].topk(16).indices.sort().values)
    assert keep.dtype == torch.long and tickets.keep_idx.dtype == torch.int16  # stored small, handed out as indices


def test_gradient_rollout_adds_each_blocks_relevance_through_the_residual():
    eye = torch.eye(4).expand(2, 4, 4)
    zero = torch.zeros(2, 4, 4)
    assert torch.equal(gradient_rollout([zero, zero]), eye)  # no relevant attention: each token explains itself
    a, b = torch.rand(2, 4, 4), torch.rand(2, 4, 4)
    assert torch.allclose(gradient_rollout([a, b]), (eye + b) @ (eye + a))


def test_gradient_scores_weigh_the_real_attention_by_the_gradient_of_each_images_label(tiny_cfg):
    # Chefer et al. (2021): per block E_heads[(dlogit_label/dA * A)+], rolled out; checked against
    # timm's plain attention caught at its softmax and differentiated by autograd directly.
    model = build_model(tiny_cfg).eval()
    x, labels = torch.randn(3, 3, 16, 16), torch.tensor([1, 4, 7])
    caught = []
    real_softmax = torch.Tensor.softmax

    def spy(t, dim):
        out = real_softmax(t, dim)
        if out.dim() == 4 and out.shape[-1] == 17:
            out.retain_grad()
            caught.append(out)
        return out

    for blk in model.blocks:
        blk.attn.fused_attn = False
    torch.Tensor.softmax = spy
    try:
        model(x).gather(1, labels[:, None]).sum().backward()
    finally:
        torch.Tensor.softmax = real_softmax
    expected = gradient_rollout([(a.grad * a).clamp_min(0).mean(1) for a in caught])[:, 0, 1:]
    model.zero_grad()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    scores, _ = score_batch(model, x, TicketConfig(select="attention", method="grad", norm_outliers=False), labels)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # the model is left as it was
    assert all(p.grad is None for p in model.parameters())  # and no gradients are left on its weights
    other, _ = score_batch(
        model, x, TicketConfig(select="attention", method="grad", norm_outliers=False), torch.tensor([0, 0, 0])
    )
    assert not torch.allclose(other, scores)  # the scores explain each image's own class
    with pytest.raises(LotusError, match="gradient of each image's label"):
        score_batch(model, x, TicketConfig(select="attention", method="grad"))
