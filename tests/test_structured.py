"""Structured pruning: heads and MLP neurons removed for real, and the shrunk model everywhere."""

import copy
import io
import json

import httpx
import numpy as np
import pytest
import torch
from conftest import live_server
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from lotus import LotusError
from lotus.checkpoint import load_model, save_model
from lotus.data import DataConfig
from lotus.export import ExportConfig, export_onnx
from lotus.masks import apply_masks_, magnitude_masks, prunable_names
from lotus.prune import prune_structured
from lotus.runtime import ort_session
from lotus.structured import StructuredConfig, activation_scores, choose, group_scores, shrink_, structure_masks
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig, build_model, count_parameters, structure_of
from serve.settings import Settings

DIGITS = DataConfig("digits", img_size=16)
CPU = torch.device("cpu")


def magnitude_scores(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return group_scores(model, "magnitude", [], CPU)


def random_vit(cfg: ModelConfig) -> torch.nn.Module:
    """A model whose biases are non-zero too: a removed unit must not leak its bias."""
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("heads, mlp", [(1 / 3, 0.5), (2 / 3, 0.25), (0.0, 0.9)])
def test_shrunk_model_gives_the_masked_originals_logits(tiny_cfg, heads, mlp):
    model = random_vit(tiny_cfg)
    head_scores, neuron_scores = magnitude_scores(model)
    keep = choose(head_scores, neuron_scores, StructuredConfig(heads=heads, mlp=mlp))
    masked = apply_masks_(copy.deepcopy(model), structure_masks(model, keep))
    shrink_(model, keep)
    kept_heads = 3 - round(heads * 3)
    assert structure_of(model) == {"num_heads": [kept_heads] * 2, "mlp_hidden": [768 - round(mlp * 768)] * 2}
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 64 * kept_heads, 192)  # physically smaller
    x = torch.randn(4, 3, 16, 16)
    keep_idx = torch.stack([torch.randperm(16)[:6] for _ in range(4)])
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)
        assert torch.allclose(model(x, keep_idx), masked(x, keep_idx), atol=1e-5)
        assert torch.allclose(model.forward_dropping(x, 8, 1), masked.forward_dropping(x, 8, 1), atol=1e-5)


def test_activation_importance_removes_the_units_that_contribute_nothing(tiny_cfg):
    model = random_vit(tiny_cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj.weight[:, 64:128] = 0  # head 1 writes nothing to the residual stream
            blk.mlp.fc2.weight[:, :384] *= 1e-3  # neurons 0..383 almost nothing
    heads, neurons = activation_scores(model, [(torch.randn(8, 3, 16, 16), None)], torch.device("cpu"))
    assert all(h[1] == 0 and (h[[0, 2]] > 0).all() for h in heads)
    keep = choose(heads, neurons, StructuredConfig(heads=1 / 3, mlp=0.5))
    assert keep["heads"] == [[0, 2], [0, 2]]
    assert keep["mlp"] == [list(range(384, 768))] * 2
    magnitude_keep = choose(*magnitude_scores(model), StructuredConfig(heads=1 / 3, mlp=0.5))
    assert magnitude_keep["heads"] == [[0, 2], [0, 2]]  # zero columns zero the weight-norm score too


def test_fractions_that_remove_everything_are_refused(tiny_cfg):
    scores = magnitude_scores(build_model(tiny_cfg))
    with pytest.raises(LotusError, match="would leave a block none of its 3"):
        choose(*scores, StructuredConfig(heads=0.9))
    with pytest.raises(LotusError, match="outside"):
        choose(*scores, StructuredConfig(mlp=1.0))
    with pytest.raises(LotusError, match="fewer than one per block"):
        choose(*scores, StructuredConfig(heads=0.8, scope="global"))  # 6 heads in 2 blocks: 1 left


def test_taylor_importance_ranks_a_harmful_head_above_a_silent_one(tiny_cfg):
    model = random_vit(tiny_cfg)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj.weight[:, :64] = 0  # head 0 writes nothing: removing it changes nothing
            blk.attn.qkv.weight[[r for s in range(3) for r in range(s * 192, s * 192 + 64)]] = 0
            blk.attn.qkv.bias.zero_()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    heads, neurons = group_scores(model, "taylor", [(x, y)], CPU)
    assert all(h[0] == 0 and (h[1:] > 0).all() for h in heads)
    assert all(n.shape == (768,) and (n >= 0).all() for n in neurons)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind
    assert choose(heads, neurons, StructuredConfig(heads=1 / 3))["heads"] == [[1, 2], [1, 2]]


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_the_choice_is_torch_prunings_own(tiny_cfg, importance):
    """Scored by Torch-Pruning, chosen and cut here: the same model as its MetaPruner makes."""
    import torch_pruning as tp

    model = random_vit(tiny_cfg)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    ours = copy.deepcopy(model)
    shrink_(ours, choose(*group_scores(ours, importance, [(x, y)], CPU), StructuredConfig(heads=1 / 3, mlp=0.5)))
    blocks = list(model.blocks)
    pruner = tp.pruner.MetaPruner(
        model,
        x[:2],
        importance=tp.importance.GroupTaylorImportance()
        if importance == "taylor"
        else tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.head, model.patch_embed.proj, *(b.attn.proj for b in blocks), *(b.mlp.fc2 for b in blocks)],
        num_heads={b.attn.qkv: b.attn.num_heads for b in blocks},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=1 / 3,
        unwrapped_parameters=[(p, p.dim() - 1) for p in model.parameters(recurse=False)],
    )
    if importance == "taylor":
        torch.nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    theirs = model.state_dict()
    assert all(torch.equal(t, theirs[name]) for name, t in ours.state_dict().items())
    assert all(p.grad is None for p in ours.parameters())


def test_global_scope_lets_blocks_keep_different_widths(tiny_cfg):
    heads = [torch.tensor([5.0, 4.0, 3.0]), torch.tensor([0.1, 0.2, 9.0])]
    neurons = [torch.arange(768.0), torch.arange(768.0) - 1000]  # block 1's neurons all rank below block 0's
    keep = choose(heads, neurons, StructuredConfig(heads=0.5, mlp=0.5, scope="global"))
    assert keep["heads"] == [[0, 1], [2]]  # the three best of six: 9, 5 and 4
    assert len(keep["mlp"][0]) == 767 and keep["mlp"][1] == [767]  # block 1 keeps only its best neuron
    model = random_vit(tiny_cfg)
    masked = apply_masks_(copy.deepcopy(model), structure_masks(model, keep))
    shrink_(model, keep)
    assert structure_of(model) == {"num_heads": [2, 1], "mlp_hidden": [767, 1]}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-block digits model with 30% unstructured sparsity, trained briefly."""
    root = tmp_path_factory.mktemp("structured")
    torch.manual_seed(0)
    train(DIGITS, ModelConfig(depth=2), TrainConfig(epochs=2, batch_size=64), root / "dense")
    model, meta = load_model(root / "dense")
    names = prunable_names(model)
    masks = magnitude_masks({n: p.detach() for n, p in model.named_parameters() if n in names}, 0.3)
    apply_masks_(model, masks)
    save_model(root / "masked", model, ModelConfig(**meta["model"]), meta["preprocess"], masks, data=meta["data"])
    return root


def test_prune_structured_saves_a_smaller_model_that_reloads(trained):
    out = trained / "shrunk"
    result = prune_structured(
        trained / "masked", out, StructuredConfig(heads=1 / 3, mlp=0.5, importance="activation"), data_cfg=DIGITS
    )
    assert result["structure"] == {"num_heads": [2, 2], "mlp_hidden": [384, 384]}
    assert 0.5 < result["parameters"]["ratio"] < 0.7
    model, meta = load_model(out)  # the sidecar's structure rebuilds the narrow blocks
    assert structure_of(model) == result["structure"] and count_parameters(model) == result["parameters"]["after"]
    assert meta["structure"] == result["structure"]
    # the unstructured masks were cut to the new shapes and still hold (load_model checks zeros)
    assert meta["masks"]["blocks.0.mlp.fc1.weight"].shape == (384, 192)
    assert 0.25 < meta["sparsity"]["overall"] < 0.35
    assert result["accuracy"] > 10  # digits is 10 classes: the shrunk model is still a classifier


def test_fine_tuning_a_shrunk_model_keeps_its_shape_and_masks(trained):
    prune_structured(
        trained / "masked",
        trained / "shrunk-ft-src",
        StructuredConfig(heads=1 / 3, mlp=0.5, importance="taylor"),
        data_cfg=DIGITS,
    )
    history = train(
        DIGITS,
        ModelConfig(),
        TrainConfig(epochs=1, batch_size=64),
        trained / "shrunk-ft",
        init_checkpoint=trained / "shrunk-ft-src",
    )
    model, meta = load_model(trained / "shrunk-ft")
    assert structure_of(model) == {"num_heads": [2, 2], "mlp_hidden": [384, 384]}
    assert history[-1]["test_accuracy"] > 10
    assert meta["masks"] and all((dict(model.named_parameters())[n][~m] == 0).all() for n, m in meta["masks"].items())


@pytest.mark.slow
def test_cli_shrinks_then_export_int8_and_serving_work(trained, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "prune",
            "structured",
            "--checkpoint",
            str(trained / "dense"),
            "--heads",
            "0.34",
            "--mlp",
            "0.5",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["structure"]["num_heads"] == [2, 2] and line["parameters"]["ratio"] < 0.7

    fp32 = export_onnx(tmp_path / "run", tmp_path / "model.onnx", DIGITS, ExportConfig())
    assert max(fp32["max_abs_diff"].values()) <= 1e-4  # ONNX Runtime matches PyTorch on the shrunk graph
    export_onnx(tmp_path / "run", tmp_path / "model.int8.onnx", DIGITS, ExportConfig(quantize="int8"))
    dense_size = export_onnx(trained / "dense", tmp_path / "dense.onnx", None, ExportConfig(verify=False))
    assert (tmp_path / "model.onnx").stat().st_size < 0.75 * (tmp_path / "dense.onnx").stat().st_size, dense_size
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16), dtype=np.float32)
    for drop in (0.0, 0.5):
        logits = ort_session(tmp_path / "model.int8.onnx").run(None, {"pixel_values": x, "drop": np.array(drop, np.float32)})[0]
        assert logits.shape == (3, 10) and np.isfinite(logits).all()

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, "PNG")
    with live_server(Settings(model=tmp_path / "model.int8.onnx", api_key=None)) as url:
        answer = httpx.post(url + "/v1/classify", params={"drop": 0.5}, files={"file": ("x.png", buf.getvalue())})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) >= 1


def test_cli_errors_are_one_line(trained, tmp_path):
    result = CliRunner().invoke(
        app, ["prune", "structured", "--checkpoint", str(trained / "dense"), "--heads", "1.0", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "outside [0, 1)" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app,
        ["prune", "structured", "--checkpoint", str(trained / "dense"), "--importance", "fisher", "--out", str(tmp_path / "y")],
    )
    assert result.exit_code == 2 and "is not one of: magnitude, activation, taylor" in result.output
