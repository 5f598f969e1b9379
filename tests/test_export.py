"""ONNX export: real ONNX Runtime against PyTorch, metadata, int8, keep indices, failures."""

import json

import numpy as np
import onnx
import pytest
import torch

from lotus import LotusError
from lotus.bench import LocalBenchConfig, bench_local
from lotus.checkpoint import load_model, save_model
from lotus.data import DataConfig
from lotus.export import ExportConfig, export_onnx, keep_idx_path
from lotus.masks import apply_masks_, magnitude_masks, prunable_names
from lotus.runtime import ort_session, read_metadata
from lotus.vit import ModelConfig, build_model

DIGITS = DataConfig("digits")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A small pruned model saved as a run folder, with the digits preprocessing."""
    run = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(num_classes=10, img_size=16, patch_size=4, depth=4, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    names = prunable_names(model)
    masks = magnitude_masks({n: p.detach() for n, p in model.named_parameters() if n in names}, 0.4)
    apply_masks_(model, masks)
    pre = {"img_size": 16, "mean": [0.3] * 3, "std": [0.4] * 3, "classes": [str(i) for i in range(10)], "dataset": "digits"}
    save_model(run, model, cfg, pre, masks, sparsity={"overall": 0.4}, tickets={"drop": 0.1})
    return run


@pytest.fixture(scope="module")
def exported(pruned_run, tmp_path_factory):
    """The pruned run exported and verified; the report records the splits the export read."""
    import lotus.data

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    splits, real = [], lotus.data.load_split
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lotus.data, "load_split", lambda cfg, split: splits.append(split) or real(cfg, split))
        report = export_onnx(pruned_run, out, DIGITS, ExportConfig())
    return out, {**report, "splits_read": splits}


def test_the_export_chooses_nothing_on_the_test_split(exported):
    """One read of the test split, for verification (a logit comparison); the select block is a
    setting, chosen by no accuracy."""
    _, report = exported
    assert report["splits_read"] == ["test"] and report["select_block"] == 4 // 6


def test_export_matches_pytorch_at_every_batch_and_drop(pruned_run, exported):
    path, report = exported
    assert all(diff <= 1e-4 for diff in report["max_abs_diff"].values())
    onnx.checker.check_model(onnx.load(str(path)))
    model, _ = load_model(pruned_run)
    session = ort_session(path)
    for batch in (1, 3, 17):
        x = torch.randn(batch, 3, 16, 16)
        for drop in (0.0, 0.1, 0.3, 0.5, 0.9):
            got = session.run(None, {"pixel_values": x.numpy(), "drop": np.array(drop, dtype=np.float32)})[0]
            num_keep = 16 - round(drop * 16)
            with torch.no_grad():
                expected = model.forward_dropping(x, num_keep, report["select_block"])
                dense = model(x)
            assert np.abs(got - expected.numpy()).max() <= 1e-4
            if drop == 0.0:  # no drop is exactly the dense model
                assert np.abs(got - dense.numpy()).max() <= 1e-4


def test_keep_index_graph_runs_the_lottery_forward(pruned_run, exported):
    path, _ = exported
    model, _ = load_model(pruned_run)
    session = ort_session(keep_idx_path(path))
    for num_keep in (4, 16):
        x = torch.randn(5, 3, 16, 16)
        keep = torch.stack([torch.randperm(16)[:num_keep] for _ in range(5)])
        got = session.run(None, {"pixel_values": x.numpy(), "keep_idx": keep.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(x, keep).numpy()).max() <= 1e-4


def test_metadata_lets_a_user_preprocess_without_the_run_folder(exported):
    path, _ = exported
    meta = read_metadata(path)
    assert meta["img_size"] == "16" and meta["patch_size"] == "4" and meta["num_patches"] == "16"
    assert json.loads(meta["mean"]) == [0.3] * 3 and json.loads(meta["std"]) == [0.4] * 3
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert float(meta["sparsity"]) == pytest.approx(0.4) and meta["train_drop"] == "0.1"
    assert meta["lotus_version"]


def test_pruned_zeros_reach_the_graph(exported):
    _, report = exported
    assert report["exported_sparsity"] == pytest.approx(report["checkpoint_sparsity"]) == pytest.approx(0.4, abs=1e-4)


@pytest.mark.slow
def test_int8_runs_and_still_drops_patches(pruned_run, tmp_path):
    out = tmp_path / "model.int8.onnx"
    report = export_onnx(pruned_run, out, DIGITS, ExportConfig(quantize="int8"))
    assert out.stat().st_size < 0.5 * (4 * sum(p.numel() for p in load_model(pruned_run)[0].parameters()))  # int8 weights
    assert {"fp32_accuracy", "int8_accuracy", "int8_accuracy_drop_0.5"} <= set(report)
    graph = onnx.load(str(out)).graph
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node)
    ops = {n.op_type for n in graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops  # the patch embedding stays fp32: ConvInteger is slow
    session = ort_session(out)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16), dtype=np.float32)
    for drop in (0.0, 0.5):
        logits = session.run(None, {"pixel_values": x, "drop": np.array(drop, dtype=np.float32)})[0]
        assert logits.shape == (4, 10) and np.isfinite(logits).all()
    assert read_metadata(out)["quantize"] == "int8"


@pytest.mark.slow
def test_a_failed_verification_writes_nothing(pruned_run, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(LotusError, match="not faithful and was not written"):
        export_onnx(pruned_run, out, DIGITS, ExportConfig(tolerance=0.0))  # no export is bit-exact
    assert list(tmp_path.iterdir()) == []


def test_bench_local_reports_every_cell(exported):
    path, _ = exported
    result = bench_local(path, LocalBenchConfig(batch_sizes=(1, 4), drops=(0.0, 0.5), runs=5, warmup=1))
    assert [(c["batch"], c["drop"]) for c in result["cells"]] == [(1, 0.0), (1, 0.5), (4, 0.0), (4, 0.5)]
    assert all(c["runs"] == 5 and c["p99_ms"] >= c["median_ms"] > 0 for c in result["cells"])
    assert result["cells"][0]["vs_drop0"] == 1.0
    with pytest.raises(LotusError, match="not found"):
        bench_local(path.with_name("nothing.onnx"))


def test_the_cli_exports_token_merging_verified_beside_the_dropping_graph(pruned_run, tmp_path):
    """`lotus export onnx --merge R` writes the ToMe graph (no drop input, no keep-index twin) under
    its own name, verified against PyTorch, with the metadata a client preprocesses by."""
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from lotus.merge import forward_merging

    pruned_run = shutil.copytree(pruned_run, tmp_path / "run")
    result = CliRunner().invoke(app, ["export", "onnx", str(pruned_run), "--merge", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = pruned_run / "model.tome-r3.onnx"
    assert report["path"] == str(out) and "keep_idx_path" not in report and report["max_abs_diff"]["r3"] <= 1e-4
    assert not (pruned_run / "model.onnx").exists() and not keep_idx_path(out).exists()
    session = ort_session(out)
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    meta = read_metadata(out)
    assert meta["merge_per_block"] == "3" and json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["mean"]) == [0.3] * 3 and meta["train_drop"] == "0.1"
    model, _ = load_model(pruned_run)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = forward_merging(model.eval(), x, 3).numpy()
    assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - expected).max() <= 1e-4

    refused = CliRunner().invoke(app, ["export", "onnx", str(pruned_run), "--merge", "3", "--select-block", "1"])
    assert refused.exit_code == 2 and "a merging graph (--merge) drops none" in refused.stderr
    with pytest.raises(LotusError, match="time it with --drop 0"):
        bench_local(out, LocalBenchConfig(batch_sizes=(1,), drops=(0.0, 0.5), runs=1, warmup=0))
    assert bench_local(out, LocalBenchConfig(batch_sizes=(1,), drops=(0.0,), runs=2, warmup=0))["cells"][0]["runs"] == 2


def test_a_drop_aware_model_is_exported_at_the_block_it_was_trained_with(tmp_path):
    """Trained drop-aware at select block 2, a model is served choosing with block 2 unless the
    export is told otherwise (the default would be block 0 at depth 4)."""
    cfg = ModelConfig(num_classes=10, img_size=16, patch_size=4, depth=4, drop_path_rate=0.0)
    pre = {"img_size": 16, "mean": [0.3] * 3, "std": [0.4] * 3, "classes": [str(i) for i in range(10)], "dataset": "digits"}
    save_model(tmp_path / "run", build_model(cfg).eval(), cfg, pre, train={"drop_aware": [0.5], "select_block": 2})
    trained = export_onnx(tmp_path / "run", tmp_path / "a.onnx", None, ExportConfig(verify=False))
    told = export_onnx(tmp_path / "run", tmp_path / "b.onnx", None, ExportConfig(verify=False, select_block=1))
    assert (trained["select_block"], read_metadata(tmp_path / "a.onnx")["select_block"]) == (2, "2")
    assert (told["select_block"], read_metadata(tmp_path / "b.onnx")["select_block"]) == (1, "1")
