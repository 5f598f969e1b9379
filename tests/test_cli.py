"""The `lotus` console script as users run it: real processes, real files, a real kill."""

import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LOTUS = str(Path(sys.executable).with_name("lotus"))
FAST = ["--depth", "1", "--batch-size", "16", "--seed", "3"]
TIMINGS = ("epoch_seconds", "epoch_cpu_seconds", "images_per_second")


def lotus(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([LOTUS, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.mark.slow
def test_train_then_eval(tmp_path):
    proc = lotus("train", "--epochs", "2", *FAST, "--out", tmp_path / "run")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout: one JSON line per epoch
    assert [line["epoch"] for line in lines] == [1, 2]
    assert "checkpoint:" in proc.stderr
    result = json.loads(lotus("eval", tmp_path / "run").stdout)
    assert result["accuracy"] == pytest.approx(lines[-1]["test_accuracy"])
    assert result["images"] == 360


@pytest.mark.slow
def test_latest_run_is_the_default(tmp_path):
    lotus("train", "--epochs", "1", *FAST, cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("train-") and (run / "model.safetensors").is_file()
    assert json.loads(lotus("eval", cwd=tmp_path).stdout)["checkpoint"] == str(Path("runs") / run.name)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "no/such/folder"], "neither 'digits', 'cifar10' nor a folder"),
        (["train", "--model", "resnet18"], "not a timm VisionTransformer"),
        (["train", "--pretrained", "--epochs", "1"], "could not load pretrained weights"),
        (["train", "--data", "cifar10", "--data-dir", "empty"], "CIFAR-10 not found"),
        (["eval"], "no run folder under runs/"),
        (["eval", "missing.safetensors"], "missing.safetensors not found"),
        (["prune", "sweep", "--sparsities", "0.1,half"], "--sparsities '0.1,half' is not a comma-separated list"),
        (["compress", "--structure", "depth=2"], "write it as heads=FRACTION,mlp=FRACTION"),
        (["bench"], "pass a URL to load a server"),
    ],
)
@pytest.mark.slow
def test_user_errors_are_one_line(tmp_path, args, message):
    proc = lotus(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def save_vit_tiny(path: Path, **sizes) -> Path:
    """A timm ViT-Tiny's weights, as a hub cache holds them (or torch.save writes them, for .pth)."""
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("vit_tiny_patch16_224", **sizes).state_dict()
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_train_from_a_weight_file(tmp_path, suffix):
    """Digits at 16px (4px patches: a 4x4 grid) from weights made for 32px images and 7 classes."""
    weights = save_vit_tiny(tmp_path / f"vit_tiny{suffix}", img_size=32, patch_size=4, num_classes=7, depth=2)
    flag = "--pretrained" if suffix == ".pth" else "--pretrained-path"  # `--pretrained FILE` is the same option
    lotus("train", flag, weights, "--depth", "2", "--epochs", "1", "--batch-size", "16", "--out", tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["pretrained"] == {"source": "file", "file": str(weights), "sha256": digest}
    assert meta["model"]["pretrained"] == str(weights)
    assert meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # what timm gives vit_tiny_patch16_224's hub weights
    tensors = load_file(tmp_path / "run" / "model.safetensors")
    assert tensors["head.weight"].shape == (10, 192) and tensors["pos_embed"].shape == (1, 1 + 4 * 4, 192)
    weights.unlink()  # a checkpoint rebuilds without the file it started from
    assert json.loads(lotus("eval", tmp_path / "run").stdout)["images"] == 360


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, weights, message",
    [
        ("train", "missing.safetensors", "--pretrained-path missing.safetensors not found"),
        ("train", "vit_small.safetensors", "--pretrained-path vit_small.safetensors does not fit vit_tiny_patch16_224"),
        ("compress", "vit_small.safetensors", "--pretrained-path vit_small.safetensors does not fit vit_tiny_patch16_224"),
    ],
)
def test_weight_files_that_do_not_fit_leave_no_run_folder(tmp_path, command, weights, message):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_small_patch16_224", img_size=16, depth=2).state_dict(), tmp_path / "vit_small.safetensors")
    proc = lotus(command, "--pretrained-path" if command == "train" else "--pretrained", weights, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_pretrained_takes_a_file_or_nothing():
    from cli.main import pretrained_file_args

    assert pretrained_file_args(["train", "--pretrained", "w.pth", "--epochs", "1"]) == [
        "train",
        "--pretrained-path",
        "w.pth",
        "--epochs",
        "1",
    ]
    assert pretrained_file_args(["train", "--pretrained=w.npz"]) == ["train", "--pretrained-path", "w.npz"]
    assert pretrained_file_args(["train", "--pretrained", "--epochs", "1"]) == ["train", "--pretrained", "--epochs", "1"]
    assert pretrained_file_args(["compress", "--pretrained"]) == ["compress", "--pretrained"]


def test_every_command_is_listed_with_its_options():
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    for command in ("train", "eval", "tickets", "compress", "bench", "serve", "export", "prune"):
        assert f" {command} " in top.stdout
    assert runner.invoke(app, ["--version"]).stdout.startswith("lotus ")
    sweep = runner.invoke(app, ["prune", "sweep", "--help"], env={"COLUMNS": "200"})
    assert (
        sweep.exit_code == 0
        and "--data-dir" in sweep.stdout
        and "--device" in sweep.stdout
        and "runs/sweep-DATE-TIME" in sweep.stdout
    )


@pytest.mark.slow
def test_progress_bars_on_a_terminal(tmp_path):
    """On a terminal, stderr shows one bar per epoch with its status; stdout stays JSON lines."""
    leader, follower = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm", "COLUMNS": "160"}
    proc = subprocess.Popen(
        [LOTUS, "train", "--epochs", "2", *FAST, "--out", str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    screen = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed its end of the terminal
            break
        if not chunk:
            break
        screen.append(chunk.decode(errors="replace"))
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    screen = "".join(screen)
    assert "epoch 1/2" in screen and "epoch 2/2" in screen and "loss" in screen
    assert "test accuracy" in screen
    assert [json.loads(line)["epoch"] for line in proc.stdout.read().splitlines()] == [1, 2]


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_matches_an_uninterrupted_run(tmp_path):
    args = ["train", "--epochs", "4", *FAST]
    lotus(*args, "--out", tmp_path / "straight")

    run = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [LOTUS, *args, "--out", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    first = proc.stdout.readline()  # epoch 1 finished; epoch 2 is running
    assert json.loads(first)["epoch"] == 1
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 4 and not (run / "model.safetensors").exists()

    lotus(*args, "--out", run, "--resume")
    assert metrics(run) == metrics(tmp_path / "straight")


@pytest.mark.slow
def test_tickets_then_train_on_them(tmp_path):
    lotus("train", "--epochs", "1", *FAST, "--out", tmp_path / "base")
    proc = lotus(
        "tickets", "--checkpoint", tmp_path / "base", "--select", "attention", "--drop", "0.25", "--out", tmp_path / "tk"
    )
    assert "kept 12 of 16 patches in each of 1365 images" in proc.stderr.replace("\n", " ")
    assert (tmp_path / "tk" / "tickets.png").stat().st_size > 10_000
    lotus("train", "--epochs", "1", *FAST, "--tickets", tmp_path / "tk", "--out", tmp_path / "lottery")
    meta = json.loads((tmp_path / "lottery" / "model.json").read_text())
    assert meta["tickets"]["num_keep"] == 12
    proc = lotus("tickets", "--checkpoint", tmp_path / "base", "--drop", "0.25", "--out", tmp_path / "rt")  # the default
    assert "kept 12 of 16 patches in each of 1365 images at random" in proc.stderr.replace("\n", " ")
    from PIL import Image

    shown = [Image.open(tmp_path / tk / "tickets.png").height for tk in ("tk", "rt")]
    assert shown[1] < 0.75 * shown[0]  # random tickets are drawn without a score map under each image
    bad = lotus("tickets", "--checkpoint", tmp_path / "base", "--drop", "1.5", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "--drop 1.5 is outside [0, 1)" in bad.stderr
    # the same scores cut at another drop ratio, without scoring again
    recut = ("tickets", "--checkpoint", tmp_path / "base", "--scores-from", tmp_path / "tk", "--select", "attention")
    proc = lotus(*recut, "--drop", "0.5", "--out", tmp_path / "tk2")
    assert "kept 8 of 16 patches" in proc.stderr.replace("\n", " ")
    from lotus.tickets import balance_scores, load_tickets

    first, second = load_tickets(tmp_path / "tk"), load_tickets(tmp_path / "tk2")
    assert torch.equal(second.scores, first.scores) and torch.equal(
        second.keep_idx.long(), second.scores.topk(8).indices.sort().values
    )
    lotus(*recut, "--drop", "0.5", "--balance", "--out", tmp_path / "tk3")
    balanced = load_tickets(tmp_path / "tk3")
    assert torch.equal(balanced.keep_idx.long(), balance_scores(first.scores).topk(8).indices.sort().values)
    assert not torch.equal(balanced.keep_idx, second.keep_idx)
    bad = lotus(*recut, "--layers", "-1", "--out", tmp_path / "x", check=False)
    assert (
        bad.returncode == 2
        and "scored with other settings, layers 'all' (asked: (-1,))" in bad.stderr
        and not (tmp_path / "x").exists()
    )


@pytest.mark.slow
def test_bench_local_prints_the_table_and_writes_json(tiny_onnx, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "bench.json"
    args = ["bench", "--local", str(tiny_onnx), "--batch-sizes", "1,2", "--drop", "0,0.5", "--runs", "3", "--warmup", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.strip().splitlines()
    assert "median ms" in header and len(rows) == 4
    cells = json.loads(out.read_text())["cells"]
    assert [(c["batch"], c["drop"]) for c in cells] == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    assert f"results: {out}" in result.stderr.replace("\n", "")
