"""`lotus compress`: the run folder, the recipe, resuming after a kill, reproducing a run."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lotus.pipeline import CompressConfig, default_compress_config, from_dict, load_recipe, save_recipe, to_dict
from lotus.prune import ISPConfig
from lotus.train import TrainConfig
from lotus.vit import ModelConfig

pytestmark = pytest.mark.slow  # every test here runs the pipeline or several processes

LOTUS = str(Path(sys.executable).with_name("lotus"))
RESULT_KEYS = ("dense_accuracy", "compressed_accuracy", "sparsity", "drop", "essential_sparsity")


def tiny_recipe(path: Path, **changes) -> Path:
    cfg = default_compress_config("digits")
    cfg = replace(
        cfg,
        **{
            "model": ModelConfig(depth=1, drop_path_rate=0.0),
            "baseline": TrainConfig(epochs=3, batch_size=64, lr=1e-3, warmup_epochs=0.5),
            "finetune": TrainConfig(epochs=4, batch_size=32, lr=5e-4, warmup_epochs=0.5),
            **changes,
        },
    )
    save_recipe(cfg, path)
    return path


def lotus(*args, check=True, cwd=None):
    proc = subprocess.run(
        [LOTUS, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_recipe_round_trip(tmp_path):
    cfg = replace(default_compress_config("digits"), sparsity="auto", isp_target=0.5)
    save_recipe(cfg, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == cfg
    assert from_dict(CompressConfig, to_dict(cfg)) == cfg
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"sparsity": 0.3, "colour": "red"}))
    with pytest.raises(Exception, match="unknown CompressConfig settings in the recipe: colour"):
        load_recipe(tmp_path / "bad.yaml")


def test_compress_writes_the_run_folder_and_reproduces_from_its_recipe(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml")
    first = lotus("compress", "--recipe", recipe, "--out", tmp_path / "a")
    run = tmp_path / "a"
    for name in (
        "recipe.yaml",
        "metrics.json",
        "history.csv",
        "report.md",
        "model.safetensors",
        "model.json",
        "accuracy_per_stage.png",
        "finetune.png",
        "tickets/tickets.png",
        "stage1/model.safetensors",
        "baseline/model.safetensors",
        "finetune/model.safetensors",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(RESULT_KEYS) <= set(metrics) and metrics["drop"] == 0.1
    assert metrics["sparsity"] == pytest.approx(0.3, abs=1e-5)
    for stage in ("baseline", "tickets", "prune", "finetune", "evaluate"):
        assert {"accuracy", "seconds", "images_per_second"} <= set(metrics["stages"][stage])
    report = (run / "report.md").read_text()
    assert "| test accuracy |" in report and "(drop 0.1, fixed per image, at random)" in report
    assert "Classes (10): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9." in report  # the digits name their classes by themselves
    assert json.loads(first.stdout.splitlines()[-1])["compressed_accuracy"] == metrics["compressed_accuracy"]

    lotus("compress", "--recipe", run / "recipe.yaml", "--out", tmp_path / "b")
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert {k: again[k] for k in RESULT_KEYS} == {k: metrics[k] for k in RESULT_KEYS}
    refused = lotus("compress", "--recipe", recipe, "--out", run, check=False)
    assert refused.returncode == 2 and "already holds a compress run" in refused.stderr


def test_compress_with_structure_fine_tunes_a_shrunk_model(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", finetune=TrainConfig(epochs=1, batch_size=64, lr=5e-4, warmup_epochs=0.5))
    done = lotus(
        "compress",
        "--recipe",
        recipe,
        "--structure",
        "heads=0.34,mlp=0.5",
        "--select",
        "attention",
        "--fuse",
        "--out",
        tmp_path / "s",
    )
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["structure"] == {"num_heads": [2], "mlp_hidden": [384]} and 0.5 < metrics["parameters_ratio"] < 0.8
    assert metrics["sparsity"] == pytest.approx(0.3, abs=0.01)  # the unstructured masks were cut to the new shapes
    assert "structure" in metrics["stages"] and "[4/7] structure" in done.stderr  # no ISP stage
    from lotus.checkpoint import load_model
    from lotus.vit import structure_of

    model, meta = load_model(tmp_path / "s")
    assert structure_of(model) == metrics["structure"] and meta["masks"]
    assert "Structured: heads per block [2]" in (tmp_path / "s" / "report.md").read_text()
    assert load_recipe(tmp_path / "s" / "recipe.yaml").structure.mlp == 0.5
    tickets = load_recipe(tmp_path / "s" / "recipe.yaml").tickets
    assert tickets.select == "attention" and tickets.layers == "all" and tickets.fuse  # every block's attention, fused
    assert "by the attention of all blocks, the dropped ones fused into one token" in (tmp_path / "s" / "report.md").read_text()
    bad = lotus("compress", "--recipe", recipe, "--structure", "heads=half", "--out", tmp_path / "t", check=False)
    assert bad.returncode == 2 and "--structure heads" in bad.stderr and "Traceback" not in bad.stderr


def test_killed_during_finetuning_then_resumed(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml")
    lotus("compress", "--recipe", recipe, "--out", tmp_path / "straight")

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [LOTUS, "compress", "--recipe", str(recipe), "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    epochs_seen = 0
    for line in proc.stdout:  # stdout: one JSON line per epoch (3 baseline, then fine-tuning)
        epochs_seen += line.startswith('{"epoch"')
        if epochs_seen == 3 + 2:  # two fine-tuning epochs finished
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stages = json.loads((run / "stages.json").read_text())
    assert "finetune" not in stages and {"baseline", "tickets", "prune"} <= set(stages)
    baseline_mtime = (run / "baseline" / "model.safetensors").stat().st_mtime

    resumed = lotus("compress", "--out", run, "--resume")
    assert "baseline: done earlier, skipped" in resumed.stderr
    assert "resuming" in resumed.stderr  # fine-tuning continued from its last finished epoch
    assert (run / "baseline" / "model.safetensors").stat().st_mtime == baseline_mtime
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert {k: a[k] for k in RESULT_KEYS} == {k: b[k] for k in RESULT_KEYS}


def test_compress_chooses_on_validation_and_reports_on_test(tmp_path, monkeypatch):
    """Every load of a split is recorded with whether a choice was being made (the sweep behind
    --sparsity auto, ISP): no choice may read the test split; the reports name their splits."""
    import lotus.data
    import lotus.pipeline
    import lotus.train

    choosing, asked, real_load = [], [], lotus.data.load_split

    def recording(cfg, split):
        asked.append((split, bool(choosing)))
        return real_load(cfg, split)

    def while_choosing(fn):
        def wrapped(*args, **kwargs):
            choosing.append(fn.__name__)
            try:
                return fn(*args, **kwargs)
            finally:
                choosing.pop()

        return wrapped

    monkeypatch.setattr(lotus.data, "load_split", recording)
    monkeypatch.setattr(lotus.train, "load_split", recording)
    for name in ("sweep", "isp"):
        monkeypatch.setattr(lotus.pipeline, name, while_choosing(getattr(lotus.pipeline, name)))
    finetune = TrainConfig(epochs=1, batch_size=64, lr=5e-4, warmup_epochs=0.5)
    recipe = tiny_recipe(
        tmp_path / "r.yaml", sparsity="auto", isp_target=0.7, isp=ISPConfig(rounds=1, copies=2), finetune=finetune
    )
    metrics = lotus.pipeline.compress(load_recipe(recipe), tmp_path / "run", log=lambda line: None)

    assert {split for split, during in asked if during} == {"val", "train"}  # the knee, ISP's rounds; ISP's copies
    assert ("test", False) in asked  # the reports
    assert metrics["splits"]["essential_sparsity"] == "validation" and metrics["splits"]["compressed_accuracy"] == "test"
    assert metrics["validation"] == {"source": "held out of train", "fraction": 0.05, "seed": 0, "images": 72}
    swept = json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())
    assert swept["split"] == "validation" and swept["dense_accuracy"] == metrics["dense_val_accuracy"]
    assert all(metrics["stages"][s]["val_accuracy"] is not None for s in ("baseline", "prune", "isp", "finetune", "evaluate"))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| validation accuracy |" in report and "| stage | validation accuracy | test accuracy |" in report
    assert "the essential sparsity was chosen on it" in report


@pytest.mark.slow
def test_compress_a_224px_folder_from_a_vit_small_weight_file(tmp_path):
    """The whole pipeline at the scale users train: ViT-S/16 at 224 px from a timm weight file
    (no hub), on a folder of photos' size, on the CPU; a tiny folder and one epoch per stage."""
    import timm
    from conftest import write_image_folder
    from safetensors.torch import save_file

    root = write_image_folder(tmp_path / "photos", per_class=8, size=256)
    weights = tmp_path / "vit_small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", num_classes=1000).state_dict(), weights)
    cfg = default_compress_config(str(root))
    cfg = replace(cfg, model=replace(cfg.model, depth=4))  # the file's first 4 blocks: minutes less on 2 cores
    recipe = tmp_path / "short.yaml"
    save_recipe(
        replace(cfg, baseline=replace(cfg.baseline, epochs=1, batch_size=8), finetune=replace(cfg.finetune, batch_size=8)), recipe
    )
    command = ["compress", "--data", root, "--model", "vit_small_patch16_224", "--img-size", "224", "--pretrained", weights]
    lotus(*command, "--crop-pct", "0.9", "--recipe", recipe, "--epochs", "1", "--out", tmp_path / "run")
    baseline = json.loads((tmp_path / "run" / "baseline" / "model.json").read_text())
    assert baseline["pretrained"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert baseline["model"]["img_size"] == 224 and baseline["model"]["name"] == "vit_small_patch16_224"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.3, abs=0.01) and (tmp_path / "run" / "report.md").is_file()
    compressed = json.loads((tmp_path / "run" / "model.json").read_text())  # evaluated as timm evaluates, every stage
    assert baseline["preprocess"]["crop_pct"] == compressed["preprocess"]["crop_pct"] == 0.9


@pytest.mark.slow
def test_compress_fine_tunes_drop_aware_instead_of_on_tickets_distilling_from_its_baseline(tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", finetune=TrainConfig(epochs=1, batch_size=64, lr=5e-4, warmup_epochs=0.5))
    proc = lotus("compress", "--recipe", recipe, "--drop-aware", "0.3,0.5", "--distill", "--out", tmp_path / "run")
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert saved.finetune.drop_aware == (0.3, 0.5) and load_recipe(tmp_path / "run" / "recipe.yaml") == saved
    assert saved.finetune.distill == "baseline"  # the recipe names the run's own baseline, wherever the run is moved
    finetuned = json.loads((tmp_path / "run" / "finetune" / "model.json").read_text())
    assert finetuned["tickets"] is None and finetuned["train"]["drop_aware"] == [0.3, 0.5]
    assert finetuned["train"]["distill"] == str(tmp_path / "run" / "baseline")
    assert "a lottery step, its teacher's forward pass" in proc.stderr  # timed as fine-tuning ran it
    report = (tmp_path / "run" / "report.md").read_text()
    assert "drop-aware at 0.3, 0.5: the patches the exported graph keeps" in report and "drop-aware (the patches" in report
    assert "distilled from the dense baseline (weight 0.5, temperature 1)" in report
