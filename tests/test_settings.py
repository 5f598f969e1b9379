"""Settings checked before work: a bad setting of `lotus compress` (a flag, a recipe field, a
--data or --checkpoint that does not fit) is one line before the first stage, and no run folder is
left behind; `lotus train`, `tickets` and `prune` check theirs before making their run folder.
The check runs without torch, so a refusal takes a moment, not the seconds torch takes to load.
Nothing here trains: each case is refused before a stage could start."""

import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from lotus.checkpoint import save_model
from lotus.config import DEVICE_TYPES, check_device
from lotus.data import DataConfig
from lotus.errors import LotusError
from lotus.pipeline import compress, default_compress_config, load_recipe, save_recipe
from lotus.prune import ISPConfig, SweepConfig
from lotus.structured import StructuredConfig
from lotus.tickets import TicketConfig
from lotus.train import TrainConfig
from lotus.vit import ModelConfig, build_model

LOTUS = str(Path(sys.executable).with_name("lotus"))
DIGITS = default_compress_config("digits")  # DataConfig("digits", img_size=16): bundled, offline
DIGITS_CLASSES = [str(c) for c in range(10)]


def refused(tmp_path: Path, make_cfg, message: str) -> str:
    """Build the settings and run `compress` into tmp_path/run: it must refuse them with `message`
    in one line and leave no run folder (so no stage ran: the baseline is the first thing written)."""
    run = tmp_path / "run"
    with pytest.raises(LotusError) as info:
        compress(make_cfg(), run, log=lambda line: pytest.fail(f"a stage started: {line}"))
    text = str(info.value)
    assert message in text and "\n" not in text
    assert not run.exists()
    return text


@pytest.mark.parametrize(
    "make_cfg, message",
    [
        (lambda: replace(DIGITS, sparsity=1.5), "--sparsity 1.5 is outside [0, 1)"),
        (lambda: replace(DIGITS, sparsity=-0.1), "--sparsity -0.1 is outside [0, 1)"),
        (lambda: replace(DIGITS, sparsity="lots"), "--sparsity 'lots' is not a number, 'auto' or an N:M pattern"),
        (lambda: replace(DIGITS, sparsity="4:2"), "--sparsity 4:2 is not an N:M pattern"),
        (lambda: replace(DIGITS, sparsity="2:4", isp_target=0.6), "keeps an N:M pattern"),
        (lambda: replace(DIGITS, isp_target=2.0), "--isp-target 2.0 is outside (0, 1)"),
        (lambda: replace(DIGITS, isp_target=0.0), "--isp-target 0.0 is outside (0, 1)"),
        (lambda: replace(DIGITS, sparsity=0.5, isp_target=0.4), "--isp-target 0.4 is not above --sparsity 0.5"),
        (lambda: replace(DIGITS, tickets=TicketConfig(drop=1.0)), "--drop 1.0 is outside [0, 1)"),
        (lambda: replace(DIGITS, data=DataConfig("digits", val_fraction=0.6)), "--val-fraction 0.6 is outside [0, 0.5]"),
        (
            lambda: replace(DIGITS, sparsity="auto", data=DataConfig("digits", img_size=16, val_fraction=0)),
            "--sparsity auto chooses on the validation split and --val-fraction 0 leaves none",
        ),
        (lambda: replace(DIGITS, tickets=TicketConfig(drop=-0.1)), "--drop -0.1 is outside [0, 1)"),
        (
            lambda: replace(DIGITS, tickets=TicketConfig(method="grad", layers=(-1,))),
            "--method grad, --layers -1 set how attention scores patches, but these tickets are random: add --select attention",
        ),
        (lambda: replace(DIGITS, tickets=TicketConfig(balance=True)), "--balance set how attention scores"),
        (lambda: replace(DIGITS, finetune=replace(DIGITS.finetune, epochs=0)), "--epochs 0 is below 1"),
        (lambda: replace(DIGITS, finetune=replace(DIGITS.finetune, mixup=-0.5)), "--mixup -0.5 is negative"),
        (lambda: replace(DIGITS, baseline=replace(DIGITS.baseline, epochs=-1)), "--epochs -1 is below 1"),
        (lambda: replace(DIGITS, finetune=replace(DIGITS.finetune, batch_size=0)), "--batch-size 0 is below 1"),
        (lambda: replace(DIGITS, finetune=replace(DIGITS.finetune, lr=0.0)), "--lr 0.0 is not above 0"),
        (lambda: replace(DIGITS, baseline=replace(DIGITS.baseline, lr=-1e-3)), "--lr -0.001 is not above 0"),
        (lambda: replace(DIGITS, isp_target=0.5, isp=ISPConfig(rounds=0)), "ISP --rounds 0 is below 1"),
        (lambda: replace(DIGITS, isp_target=0.5, isp=ISPConfig(copies=0)), "ISP --copies 0 is below 1"),
        (lambda: replace(DIGITS, isp=ISPConfig(data_fraction=0.0)), "--data-fraction 0.0 is outside (0, 1]"),
        (lambda: replace(DIGITS, isp=ISPConfig(data_fraction=1.5)), "--data-fraction 1.5 is outside (0, 1]"),
        (lambda: replace(DIGITS, isp=ISPConfig(merge="vote", copies=3, min_votes=4)), "--min-votes between 1 and --copies 3"),
        (lambda: replace(DIGITS, sweep=SweepConfig(sparsities=(0.1, 1.0))), "--sparsities [0.1, 1.0]"),
        (lambda: replace(DIGITS, structure=StructuredConfig(heads=1.5)), "--structure heads=1.5 is outside [0, 1)"),
        (lambda: replace(DIGITS, structure=StructuredConfig(mlp=-0.5)), "--structure mlp=-0.5 is outside [0, 1)"),
        (lambda: replace(DIGITS, structure=StructuredConfig(heads=0.5, scope="row")), "structured scope 'row'"),
        (lambda: replace(DIGITS, device="gpu"), "--device 'gpu' is not a device"),
        (lambda: replace(DIGITS, finetune=replace(DIGITS.finetune, device="cuda:x")), "--device 'cuda:x' is not a device"),
        (lambda: replace(DIGITS, data=DataConfig("digits", img_size=0)), "--img-size 0 is below 1"),
    ],
)
def test_a_bad_setting_is_refused_before_any_stage(tmp_path, make_cfg, message):
    refused(tmp_path, make_cfg, message)


@pytest.mark.parametrize(
    "make_cfg, message",
    [
        (lambda tmp: replace(DIGITS, data=DataConfig(str(tmp / "no-such-data"))), "neither 'digits', 'cifar10' nor a folder"),
        (lambda tmp: replace(DIGITS, data=DataConfig("cifar10", data_dir=str(tmp))), "CIFAR-10 not found"),
        (lambda tmp: replace(DIGITS, checkpoint=str(tmp / "no-such-model")), "--checkpoint"),
        (lambda tmp: replace(DIGITS, model=ModelConfig(name="vit_no_such_model")), "unknown timm model"),
        (lambda tmp: replace(DIGITS, tickets=TicketConfig(spread=3)), "--spread 3 does not divide the 4x4 patch grid"),
        (
            lambda tmp: replace(DIGITS, tickets=TicketConfig(select="attention", layers=(7,))),
            "--layers [7] names blocks outside 0..3",
        ),
    ],
)
def test_data_checkpoint_and_model_are_checked_before_any_stage(tmp_path, make_cfg, message):
    refused(tmp_path, lambda: make_cfg(tmp_path), message)


def test_cuda_asked_for_where_there_is_none(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(tmp_path, lambda: replace(DIGITS, device="cuda"), "asked for CUDA but none is available")


def untrained_checkpoint(path: Path, classes: list[str]) -> Path:
    """An untrained 1-block model for `classes`, saved as a LOTUS checkpoint (no training)."""
    cfg = ModelConfig(depth=1, num_classes=len(classes), img_size=16, patch_size=4, drop_path_rate=0.0)
    preprocess = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": classes}
    save_model(path, build_model(cfg), cfg, preprocess)
    return path


def test_a_checkpoint_of_other_classes_is_refused(tmp_path):
    three = untrained_checkpoint(tmp_path / "three", ["a", "b", "c"])
    text = refused(tmp_path, lambda: replace(DIGITS, checkpoint=str(three)), "was trained on 3 classes")
    assert "--data digits has 10" in text


def test_a_checkpoint_trained_on_the_validation_images_is_refused(tmp_path):
    """A checkpoint trained before hold-outs (its sidecar records data, no hold-out) trained on the
    whole training split: this run's validation images would be ones it saw."""
    cfg = ModelConfig(depth=1, num_classes=10, img_size=16, patch_size=4, drop_path_rate=0.0)
    preprocess = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": DIGITS_CLASSES}
    save_model(tmp_path / "old", build_model(cfg), cfg, preprocess, data={"name": "digits"})
    text = refused(tmp_path, lambda: replace(DIGITS, checkpoint=str(tmp_path / "old")), "could be ones it trained on")
    assert "trained with 0 of each class held out" in text and "Pass --val-fraction 0" in text
    from typer.testing import CliRunner

    from cli.main import app
    from lotus.settings import check_settings

    check_settings(replace(DIGITS, checkpoint=str(tmp_path / "old"), data=replace(DIGITS.data, val_fraction=0)))
    for args in (["prune", "sweep"], ["prune", "isp"], ["train"]):  # they train it further or read its validation images
        result = CliRunner().invoke(app, [*args, "--checkpoint", str(tmp_path / "old"), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and "could be ones it trained on" in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


def test_ticket_settings_are_checked_against_the_checkpoint(tmp_path):
    one_block = untrained_checkpoint(tmp_path / "digits", DIGITS_CLASSES)
    cfg = replace(DIGITS, checkpoint=str(one_block), tickets=TicketConfig(select="attention", layers=(1,)))
    refused(tmp_path, lambda: cfg, "--layers [1] names blocks outside 0..0")


def write_recipe(path: Path, **changes) -> Path:
    """The digits recipe as `lotus compress` writes it, with some settings changed by hand."""
    save_recipe(DIGITS, path)
    values = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (values[section] if section else values)[name] = value
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"finetune.epochs": "five"}, "finetune.epochs is 'five', not a whole number"),
        ({"finetune.lr": "fast"}, "finetune.lr is 'fast', not a number"),
        ({"baseline.batch_size": 3.5}, "baseline.batch_size is 3.5, not a whole number"),
        ({"tickets.fuse": "yes"}, "tickets.fuse is 'yes', not true or false"),
        ({"finetune": 5}, "finetune is 5, not a mapping of settings"),
        ({"isp_target": 2}, "--isp-target 2 is outside (0, 1)"),
        ({"finetune.epochs": 0}, "finetune: --epochs 0 is below 1"),
        ({"colour": "red"}, "unknown CompressConfig settings in the recipe: colour"),
        ({"finetune.colour": "red"}, "unknown TrainConfig settings in the recipe: colour"),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_setting(tmp_path, changes, message):
    recipe = write_recipe(tmp_path / "recipe.yaml", **changes)
    with pytest.raises(LotusError) as info:
        load_recipe(recipe)
    assert message in str(info.value) and str(recipe) in str(info.value)


def test_recipes_still_load_and_numbers_written_as_yaml_text_are_read(tmp_path):
    """A saved recipe loads back unchanged; `lr: 5e-4` (YAML 1.1 reads it as text) is a number."""
    cfg = replace(DIGITS, sparsity="auto", isp_target=0.5, structure=StructuredConfig(heads=0.25))
    save_recipe(cfg, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == cfg
    text = (tmp_path / "recipe.yaml").read_text()
    (tmp_path / "recipe.yaml").write_text(text.replace("lr: 0.00025", "lr: 5e-4"))
    assert load_recipe(tmp_path / "recipe.yaml").finetune.lr == 5e-4
    assert replace(DIGITS, sparsity="0.4").sparsity == 0.4 and replace(DIGITS, sparsity="2:4").sparsity == "2:4"


def test_train_and_prune_configs_refuse_the_same_settings():
    with pytest.raises(LotusError, match="--epochs 0 is below 1"):
        TrainConfig(epochs=0)
    with pytest.raises(LotusError, match=r"--target 2 is outside \(0, 1\)"):
        ISPConfig(target=2)


def lotus_cli(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([LOTUS, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_console_script_refuses_in_one_line_and_makes_no_run_folder(tmp_path):
    """Through the real `lotus` process (they run side by side: each is mostly start-up)."""
    bad_recipe = write_recipe(tmp_path / "bad.yaml", **{"finetune.epochs": "five"})
    cases = {
        "default-out": (["compress", "--isp-target", "2.0"], "--isp-target 2.0 is outside (0, 1)"),  # no runs/ made
        "recipe": (["compress", "--recipe", bad_recipe, "--out", "out"], "finetune.epochs is 'five'"),
        "train": (["train", "--data", "no-such-folder"], "neither 'digits', 'cifar10' nor a folder"),
        "tickets": (["tickets", "--checkpoint", "no-such-model", "--drop", "0.5"], "--checkpoint no-such-model:"),
        "prune": (["prune", "oneshot", "--sparsity", "lots", "--out", "out"], "--sparsity 'lots' is not"),
    }
    for name in cases:
        (tmp_path / name).mkdir()
    procs = {name: lotus_cli(*args, cwd=tmp_path / name) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, stderr)
        assert stderr.strip().startswith("error:") and cases[name][1] in stderr, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr and not stdout
        assert list((tmp_path / name).iterdir()) == [], name  # no runs/ folder, no --out folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "--sparsity", "1.5", "--out", "out"], "--sparsity 1.5 is outside [0, 1)"),
        (["compress", "--sparsity", "0.5", "--isp-target", "0.5"], "--isp-target 0.5 is not above --sparsity 0.5"),
        (["compress", "--data", "no-such-folder"], "neither 'digits', 'cifar10' nor a folder"),
        (["compress", "--checkpoint", "no-such-model"], "--checkpoint no-such-model:"),
        (["compress", "--epochs", "0"], "--epochs 0 is below 1"),
        (["compress", "--drop", "1"], "--drop 1.0 is outside [0, 1)"),
        (["compress", "--structure", "heads=1.5"], "--structure heads=1.5 is outside [0, 1)"),
        (["compress", "--device", "gpu"], "--device 'gpu' is not a device"),
        (["prune", "isp", "--target", "2"], "--target 2.0 is outside (0, 1)"),
        (["prune", "isp", "--rounds", "0"], "ISP --rounds 0 is below 1"),
        (["train", "--epochs", "0"], "--epochs 0 is below 1"),
        (["train", "--select-block", "1"], "--select-block 1 sets drop-aware training's select block: add --drop-aware R"),
        (["compress", "--drop-aware", "0.5", "--select-block", "9"], "--select-block 9 is outside 0..3"),
        (["train", "--lr", "0"], "--lr 0.0 is not above 0"),
        (["train", "--distill-weight", "0.3"], "--distill-weight and --distill-temperature set distillation: add --distill"),
        (["train", "--distill", "x", "--distill-weight", "2"], "--distill-weight 2.0 is outside [0, 1]"),
        (["train", "--distill", "x", "--distill-temperature", "0"], "--distill-temperature 0.0 is not above 0"),
        (["train", "--data", "no-such-folder"], "neither 'digits', 'cifar10' nor a folder"),
        (["train", "--checkpoint", "no-such-model", "--out", "out"], "--checkpoint no-such-model:"),
        (["tickets", "--drop", "1"], "--drop 1.0 is outside [0, 1)"),
        (["tickets", "--checkpoint", "no-such-model"], "--checkpoint no-such-model:"),
        (["prune", "oneshot", "--sparsity", "lots", "--out", "out"], "--sparsity 'lots' is not"),
        (["prune", "sweep", "--checkpoint", "no-such-model"], "--checkpoint no-such-model:"),
        (["prune", "structured", "--heads", "1.5"], "--structure heads=1.5 is outside [0, 1)"),
        (["compress", "--sparsity", "auto", "--val-fraction", "0"], "--sparsity auto chooses on the validation split"),
        (["train", "--val-fraction", "0.9"], "--val-fraction 0.9 is outside [0, 0.5]"),
        (["prune", "sweep", "--val-fraction", "0", "--checkpoint", "x"], "the sweep chooses on the validation split"),
    ],
)
def test_the_commands_refuse_before_making_a_run_folder(tmp_path, monkeypatch, args, message):
    """The same commands in this process (Typer's runner): exit 2, one line, nothing written."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no --out folder


def test_single_stage_commands_check_the_checkpoint_against_the_data_first(tmp_path, monkeypatch):
    """`lotus train --checkpoint`, `tickets` and `prune`: a checkpoint of other classes than --data
    is refused from its sidecar, before the command makes its run folder."""
    from typer.testing import CliRunner

    from cli.main import app

    three = untrained_checkpoint(tmp_path / "three", ["a", "b", "c"])
    monkeypatch.chdir(tmp_path)
    for args in (
        ["train", "--checkpoint", three, "--epochs", "1"],
        ["tickets", "--checkpoint", three],
        ["prune", "oneshot", "--checkpoint", three, "--sparsity", "0.3"],
        ["prune", "isp", "--checkpoint", three, "--out", "out"],
    ):
        result = CliRunner().invoke(app, list(map(str, args)))
        assert result.exit_code == 2 and "was trained on 3 classes" in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["three.json", "three.safetensors"], args


CHECK_WITHOUT_TORCH = """
import sys
from dataclasses import replace

from typer.testing import CliRunner

from cli.main import app
from lotus.config import default_compress_config
from lotus.settings import check_inputs, check_settings

checkpoint = sys.argv[1]
for args in (
    ["compress", "--isp-target", "2.0"],
    ["compress", "--spread", "3"],
    ["compress", "--data", "no-such-folder"],
    ["compress", "--checkpoint", "no-such-model"],
    ["compress", "--checkpoint", checkpoint, "--select", "attention", "--layers", "5", "--device", "cpu"],
    ["train", "--data", "no-such-folder"],
    ["train", "--pretrained-path", "no-such-weights.safetensors"],
    ["train", "--pretrained-path", "weights.ckpt"],
    ["compress", "--pretrained-path", "no-such-weights.npz"],
    ["tickets", "--checkpoint", "no-such-model"],
    ["tickets", "--boxes", "no-such-boxes.tsv"],
    ["tickets", "--method", "grad"],  # random tickets by default: attention settings alone are refused
    ["compress", "--boxes", "no-such-boxes.tsv"],
    ["prune", "isp", "--checkpoint", checkpoint, "--target", "2"],
    ["prune", "sweep", "--checkpoint", checkpoint, "--device", "gpu"],
):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "error:" in result.output, (args, result.output)
cfg = default_compress_config("digits")
check_settings(replace(cfg, checkpoint=checkpoint, device="cpu"))  # good settings pass, torch-free too
check_inputs(cfg.data, checkpoint, "auto")
loaded = sorted({"torch", "timm", "torchvision", "safetensors.torch"} & set(sys.modules))
assert not loaded, f"the settings check imported {loaded}"
"""


def test_the_settings_check_imports_no_torch(tmp_path):
    """The CLI, the configs and the checks, refusing bad settings and passing good ones (given a
    checkpoint: only an unknown timm model and a missing CUDA need torch to tell), never import
    torch, so a refusal comes in a moment instead of after the seconds torch takes to load."""
    checkpoint = untrained_checkpoint(tmp_path / "digits", DIGITS_CLASSES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent(CHECK_WITHOUT_TORCH)
    done = subprocess.run([sys.executable, "-c", code, str(checkpoint)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.json", "digits.safetensors"]  # no run folder


@pytest.mark.parametrize(
    "name",
    [
        *DEVICE_TYPES,
        "cuda:0",
        "cuda:12",
        "cpu:0",
        "mps:1",
        "gpu",
        "CPU",
        "cuda:x",
        "cuda:01",
        "cuda:-1",
        "cuda:",
        " cpu",
        "cuda:0:1",
    ],
)
def test_device_strings_are_read_as_torch_reads_them(name):
    """`check_device` parses without torch: it must accept exactly what torch.device accepts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that 'mkldnn' is deprecated
        try:
            torch.device(name)
            torch_accepts = True
        except RuntimeError:
            torch_accepts = False
    try:
        check_device(name)
        accepted = True
    except LotusError:
        accepted = False
    assert accepted == torch_accepts
