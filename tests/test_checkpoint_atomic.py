"""Checkpoints never tear: a save that fails at any write, fsync or rename leaves a whole
checkpoint (the previous one, or the new one once its sidecar is in place), a training run
resumes from its last finished epoch, and the next successful save removes the leftovers."""

import contextlib
import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lotus.train as T
from lotus import LotusError
from lotus.checkpoint import load_checkpoint, save_checkpoint
from lotus.data import DataConfig
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig

FAULTABLE = ("write", "fsync", "replace")  # every step that puts bytes or names on the disk


@contextlib.contextmanager
def disk_full_at(monkeypatch, step: int | None, killed: bool = False):
    """Within the block, the `step`-th (1-based) os.write, os.fsync or os.replace fails as on a
    full disk (a write after putting half its bytes down); None fails nothing. Yields the log of
    (operation, args) of those calls. `killed`: nothing is deleted either, as if the process had
    died at that step instead of raising."""
    steps: list[tuple[str, tuple]] = []
    real = {name: getattr(os, name) for name in FAULTABLE}

    def faulty(name):
        def call(*args, **kwargs):
            steps.append((name, args))
            if len(steps) == step:
                if name == "write":
                    real["write"](args[0], bytes(args[1][: len(args[1]) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real[name](*args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for name in FAULTABLE:
            patch.setattr(os, name, faulty(name))
        if killed:
            patch.setattr(os, "unlink", lambda *args, **kwargs: None)
        yield steps


def step_of(steps: list[tuple[str, tuple]], target: str, nth: int = 1) -> int:
    """The 1-based step of the `nth` rename onto a file named `target`."""
    renames = [i for i, (name, args) in enumerate(steps, 1) if name == "replace" and Path(args[1]).name == target]
    return renames[nth - 1]


def tensors_of(epoch: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((256,), float(epoch)), "b": torch.arange(epoch, dtype=torch.int64)}


def assert_loads(ckpt: Path, epoch: int) -> None:
    tensors, meta = load_checkpoint(ckpt)
    assert meta["epoch"] == epoch
    assert tensors.keys() == tensors_of(epoch).keys() and all(torch.equal(tensors[k], tensors_of(epoch)[k]) for k in tensors)


def save_steps(monkeypatch, tmp_path: Path) -> tuple[int, int]:
    """How many faultable steps a save of an existing checkpoint takes, and which one is the switch."""
    save_checkpoint(tmp_path / "count", tensors_of(1), {"epoch": 1})
    with disk_full_at(monkeypatch, None) as steps:
        save_checkpoint(tmp_path / "count", tensors_of(2), {"epoch": 2})
    return len(steps), step_of(steps, "count.json")


@pytest.mark.parametrize("killed", [False, True], ids=["raised", "killed"])
def test_a_save_failing_at_any_step_leaves_a_whole_checkpoint(tmp_path, monkeypatch, killed):
    total, switch = save_steps(monkeypatch, tmp_path)
    assert total >= 9  # new tensors (write, fsync, rename, fsync), the sidecar (same), the final rename
    for fail_at in range(1, total + 1):
        ckpt = tmp_path / f"fail{fail_at}" / "ck"
        save_checkpoint(ckpt, tensors_of(1), {"epoch": 1})
        with disk_full_at(monkeypatch, fail_at, killed), pytest.raises(OSError, match="No space left on device"):
            save_checkpoint(ckpt, tensors_of(2), {"epoch": 2})
        assert_loads(ckpt, 1 if fail_at <= switch else 2)  # never the new tensors with the old sidecar
        save_checkpoint(ckpt, tensors_of(3), {"epoch": 3})  # succeeds, and sweeps what the failure left
        assert_loads(ckpt, 3)
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ck.json", "ck.safetensors"]


def test_a_first_save_failing_at_any_step_leaves_nothing_or_the_whole_checkpoint(tmp_path, monkeypatch):
    total, switch = save_steps(monkeypatch, tmp_path)
    for fail_at in range(1, total + 1):
        ckpt = tmp_path / f"fail{fail_at}" / "ck"
        with disk_full_at(monkeypatch, fail_at, killed=True), pytest.raises(OSError):
            save_checkpoint(ckpt, tensors_of(1), {"epoch": 1})
        if fail_at <= switch:
            with pytest.raises(LotusError, match="ck.safetensors not found"):
                load_checkpoint(ckpt)
        else:
            assert_loads(ckpt, 1)
        save_checkpoint(ckpt, tensors_of(2), {"epoch": 2})
        assert_loads(ckpt, 2)
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ck.json", "ck.safetensors"]


def test_a_second_failure_keeps_what_the_first_one_left_loadable(tmp_path, monkeypatch):
    total, switch = save_steps(monkeypatch, tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # 400 saves: skip the disk flushes (no power is cut here)
    for first in range(1, total + 1):
        for second in range(1, total + 1):
            ckpt = tmp_path / f"fail{first}-{second}" / "ck"
            save_checkpoint(ckpt, tensors_of(1), {"epoch": 1})
            for epoch, fail_at in ((2, first), (3, second)):
                with disk_full_at(monkeypatch, fail_at, killed=True), pytest.raises(OSError):
                    save_checkpoint(ckpt, tensors_of(epoch), {"epoch": epoch})
            assert_loads(ckpt, 3 if second > switch else 2 if first > switch else 1)
            save_checkpoint(ckpt, tensors_of(4), {"epoch": 4})
            assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ck.json", "ck.safetensors"]


def test_a_save_removes_only_its_own_leftovers(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck.v2", tensors_of(1), {"epoch": 1})
    with disk_full_at(monkeypatch, 3, killed=True), pytest.raises(OSError):  # the new tensors' rename
        save_checkpoint(tmp_path / "ck.v2", tensors_of(2), {"epoch": 2})
    theirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(theirs) == 3  # the pair and the temporary file of its failed save
    save_checkpoint(tmp_path / "ck", tensors_of(1), {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, "ck.json", "ck.safetensors"])


def test_weights_changed_after_saving_are_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "ck", tensors_of(1), {"epoch": 1})
    save_checkpoint(tmp_path / "other", tensors_of(2), {"epoch": 2})
    (tmp_path / "ck.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(LotusError, match="does not match its sidecar") as refused:
        load_checkpoint(tmp_path / "ck")
    assert "\n" not in str(refused.value)


def test_a_pair_written_by_the_previous_format_loads(tmp_path):
    import hashlib

    from safetensors.torch import save

    blob = save(tensors_of(5))  # the previous save: the tensor file, then its sidecar, in place
    (tmp_path / "ck.safetensors").write_bytes(blob)
    sidecar = {"epoch": 5, "format": "lotus-checkpoint/1", "lotus_version": "0", "sha256": hashlib.sha256(blob).hexdigest()}
    (tmp_path / "ck.json").write_text(json.dumps(sidecar))
    assert_loads(tmp_path / "ck", 5)


# --- The training state: a failed epoch save never costs more than that epoch ----------------


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()


def _state_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    optim = {f"optim.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}
    return {**{f"model.{k}": v.clone() for k, v in model.state_dict().items()}, **{k: v.clone() for k, v in optim.items()}}


def test_an_epoch_save_failing_at_any_step_resumes_from_a_finished_epoch(tmp_path, monkeypatch, capsys):
    meta = {"run": "tiny"}
    model, opt = _model_and_optimizer(0)
    history, states = [], {}
    for epoch in (1, 2):  # what an uninterrupted run saves at the end of each epoch
        _step(model, opt)
        history.append({"epoch": epoch, "train_loss": 1.0 / epoch})
        states[epoch] = _state_of(model, opt)
    out_dir = tmp_path / "count"
    out_dir.mkdir()
    T._save_epoch(out_dir, *_model_and_optimizer(0), meta, history[:1])
    with disk_full_at(monkeypatch, None) as steps:
        T._save_epoch(out_dir, *_model_and_optimizer(0), meta, history)
    switch = step_of(steps, "train_state.json")

    for fail_at in range(1, len(steps) + 1):
        out_dir = tmp_path / f"fail{fail_at}"
        out_dir.mkdir()
        for epoch in (1, 2):
            model.load_state_dict({k[6:]: v for k, v in states[epoch].items() if k.startswith("model.")})
            T._load_optimizer(opt, states[epoch], opt.state_dict()["param_groups"])
            fault = disk_full_at(monkeypatch, fail_at if epoch == 2 else None, killed=True)
            with fault, pytest.raises(OSError) if epoch == 2 else contextlib.nullcontext():
                T._save_epoch(out_dir, model, opt, meta, history[:epoch])
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] in (history[:1], history)  # whole lines, never a part

        fresh, fresh_opt = _model_and_optimizer(1)
        _step(fresh, fresh_opt)  # an optimizer with state of the right shapes, to be overwritten
        restored, start = T._restore(out_dir, True, meta, fresh, fresh_opt, torch.device("cpu"), lambda line: None)
        assert start == (2 if fail_at > switch else 1) and restored == history[:start]
        got = _state_of(fresh, fresh_opt)
        assert got.keys() == states[start].keys() and all(torch.equal(got[k], states[start][k]) for k in got)
        T._writer(out_dir, 0, restored)
        assert [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()] == restored
    capsys.readouterr()  # the epochs' JSON lines


# --- End to end: `train` killed at a write step, then resumed, ends as an uninterrupted run --


DATA = DataConfig("digits", img_size=16)
MODEL = ModelConfig(depth=1, drop_path_rate=0.1)
FAST = TrainConfig(epochs=2, batch_size=512, lr=1e-3, warmup_epochs=0.5, seed=1)
QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[list[dict], dict[str, torch.Tensor], int, list]:
    """An uninterrupted run: its metrics, its weights, and the log of its faultable steps."""
    out_dir = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as monkeypatch, disk_full_at(monkeypatch, None) as steps:
        history = train(DATA, MODEL, FAST, out_dir, **QUIET)
    return history, load_file(out_dir / "model.safetensors"), steps


# (file renamed onto, which occurrence): the epoch-2 metrics line, epoch 2's state before and
# after its switch, and the final model's switch
FAILURES = {
    "metrics": ("metrics.jsonl", 3),
    "state-switch": ("train_state.json", 2),
    "state-rename": ("train_state.safetensors", 2),
    "model-switch": ("model.json", 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("failure", FAILURES)
def test_a_run_killed_at_a_write_step_resumes_to_the_same_weights(tmp_path, monkeypatch, straight, failure, capsys):
    history, weights, steps = straight
    fail_at = step_of(steps, *FAILURES[failure])
    with disk_full_at(monkeypatch, fail_at, killed=True), pytest.raises(OSError, match="No space left on device"):
        train(DATA, MODEL, FAST, tmp_path, **QUIET)
    assert not (tmp_path / "model.safetensors").exists()

    resumed = train(DATA, MODEL, FAST, tmp_path, resume=True, **QUIET)
    keys = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")  # not the timings
    assert [[h[k] for k in keys] for h in resumed] == [[h[k] for k in keys] for h in history]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == resumed
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)
    files = ["metrics.jsonl", "model.json", "model.safetensors", "train_state.json", "train_state.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # the failed save's leftovers are gone
    capsys.readouterr()
