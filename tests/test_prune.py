"""The pruning stages end to end on a small digits model: sweep, one-shot, Instant Soup Pruning."""

import csv
import json

import pytest

from lotus.checkpoint import load_model
from lotus.data import DataConfig
from lotus.errors import LotusError
from lotus.masks import essential_sparsity, prunable_names, sparsity_report
from lotus.prune import ISPConfig, SweepConfig, isp, prune_oneshot, sweep
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig

DATA = DataConfig("digits")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    train(
        DataConfig("digits", img_size=16),
        ModelConfig(depth=2, drop_path_rate=0.0),
        TrainConfig(epochs=4, batch_size=32, lr=5e-4, warmup_epochs=0.5),
        out,
    )
    return out


def test_sweep_writes_its_curve_and_finds_the_knee(baseline, tmp_path):
    result = sweep(baseline, DATA, SweepConfig(sparsities=(0.1, 0.5, 0.9)), tmp_path)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [float(r["sparsity"]) for r in rows] == [0.1, 0.5, 0.9]
    assert {r["split"] for r in rows} == {"validation"}  # the split of every accuracy it holds
    assert all(abs(float(r["measured_sparsity"]) - float(r["sparsity"])) < 1e-5 for r in rows)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["split"] == "validation" and saved["images"] == 72
    assert (
        saved["essential_sparsity"]
        == result["essential_sparsity"]
        == essential_sparsity([0.1, 0.5, 0.9], [r["accuracy"] for r in result["rows"]], result["dense_accuracy"], 1.0)
    )
    assert result["rows"][-1]["accuracy"] < result["dense_accuracy"]  # 90% one-shot hurts
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


@pytest.fixture
def splits_read(monkeypatch) -> list[str]:
    """Every split asked of `lotus.data.load_split` (through which every stage loads its data), in order."""
    import lotus.data
    import lotus.train

    asked, real = [], lotus.data.load_split

    def recording(cfg: DataConfig, split: str):
        asked.append(split)
        return real(cfg, split)

    monkeypatch.setattr(lotus.data, "load_split", recording)
    monkeypatch.setattr(lotus.train, "load_split", recording)
    return asked


def test_choices_never_read_the_test_split(baseline, tmp_path, splits_read):
    """The sweep's knee and ISP's rounds are judged on the validation split (ISP's copies train on
    the training split less it). The export's select block: tests/test_export.py."""
    result = sweep(baseline, DATA, SweepConfig(sparsities=(0.1, 0.5)), tmp_path / "sweep")
    assert splits_read == ["val"] and result["split"] == "validation"
    prune_oneshot(baseline, 0.3, tmp_path / "s1")  # no data: nothing read
    isp(tmp_path / "s1", DATA, ISPConfig(target=0.5, rounds=1, copies=2), tmp_path / "s2", log=lambda line: None)
    assert splits_read == ["val", "val", "train"]
    assert load_model(tmp_path / "s2")[1]["accuracy_split"] == "validation"


def test_the_sweep_refuses_validation_images_the_checkpoint_trained_on(baseline, tmp_path):
    with pytest.raises(LotusError, match="trained with 0.05 of each class held out for validation, this run holds out 0.1"):
        sweep(baseline, DataConfig("digits", val_fraction=0.1), SweepConfig(), tmp_path)
    with pytest.raises(LotusError, match="the sweep chooses on the validation split and --val-fraction 0 leaves none"):
        sweep(baseline, DataConfig("digits", val_fraction=0), SweepConfig(), tmp_path)
    assert load_model(baseline)[1]["holdout"] == {"source": "held out of train", "fraction": 0.05, "seed": 0}


def test_oneshot_then_isp_reach_their_sparsities(baseline, tmp_path):
    stage1 = prune_oneshot(baseline, 0.3, tmp_path / "s1", data_cfg=DATA)
    assert stage1["sparsity"]["overall"] == pytest.approx(0.3, abs=1e-5)
    result = isp(
        tmp_path / "s1",
        DATA,
        ISPConfig(target=0.6, rounds=2, copies=2, data_fraction=0.1),
        tmp_path / "s2",
        log=lambda line: None,
    )
    assert [r["measured_sparsity"] for r in result["rounds"]] == pytest.approx([0.45, 0.6], abs=1e-5)
    model, meta = load_model(tmp_path / "s2")
    names = prunable_names(model)
    assert sparsity_report(model, names)["overall"] == pytest.approx(0.6, abs=1e-5)
    assert meta["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-5)
    assert meta["pruning"]["stage"] == "isp" and set(meta["masks"]) == set(names)
    assert json.loads((tmp_path / "s2" / "sparsity.json").read_text())["overall"] == pytest.approx(0.6, abs=1e-5)


def test_the_source_variant_reports_what_it_achieved(baseline, tmp_path):
    prune_oneshot(baseline, 0.3, tmp_path / "s1")
    result = isp(
        tmp_path / "s1", DATA, ISPConfig(target=0.6, rounds=3, merge="levels"), tmp_path / "levels", log=lambda line: None
    )
    # union of nested masks = the least sparse level (0.4), not the 0.6 asked for
    assert result["achieved_sparsity"] == pytest.approx(0.4, abs=1e-5)


def test_two_four_oneshot_holds_its_pattern_through_finetuning(baseline, tmp_path):
    stage1 = prune_oneshot(baseline, "2:4", tmp_path / "s1", data_cfg=DATA)
    assert stage1["sparsity"]["overall"] == pytest.approx(0.5)
    train(
        DATA,
        ModelConfig(),
        TrainConfig(epochs=1, batch_size=32, lr=5e-4, warmup_epochs=0.5),
        tmp_path / "ft",
        init_checkpoint=tmp_path / "s1",
    )
    model, _ = load_model(tmp_path / "ft")
    params = dict(model.named_parameters())
    for name in prunable_names(model):
        nonzero_per_group = (params[name].reshape(-1, 4) != 0).sum(1)
        assert (nonzero_per_group <= 2).all(), name  # sparse tensor cores need at most two non-zeros in every four


def test_a_two_four_pattern_refuses_what_would_break_it(baseline, tmp_path):
    from dataclasses import replace

    from lotus.errors import LotusError
    from lotus.masks import nm_pattern
    from lotus.pipeline import compress, default_compress_config

    assert nm_pattern("2:4") == (2, 4) and nm_pattern(0.3) is None and nm_pattern("auto") is None
    with pytest.raises(LotusError, match="not N:M"):
        nm_pattern("4:2")
    cfg = replace(default_compress_config("digits"), checkpoint=str(baseline), sparsity="2:4", isp_target=0.7)
    with pytest.raises(LotusError, match="ISP and structured pruning would break"):
        compress(cfg, tmp_path / "run")


def test_cli_prunes_to_two_four_and_refuses_a_bad_pattern(baseline, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(
        app, ["prune", "oneshot", "--checkpoint", str(baseline), "--sparsity", "2:4", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["sparsity"] == pytest.approx(0.5)
    result = CliRunner().invoke(
        app, ["prune", "oneshot", "--checkpoint", str(baseline), "--sparsity", "4:2", "--out", str(tmp_path / "bad")]
    )
    assert result.exit_code == 2 and "not N:M" in result.output and "Traceback" not in result.output
