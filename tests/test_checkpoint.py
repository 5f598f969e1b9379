"""Checkpoints: safetensors + sidecar round trips, torn pairs refused, atomic writes."""

import json

import pytest
import torch

from lotus import LotusError
from lotus.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from lotus.vit import build_model


def test_model_round_trip_gives_the_same_logits(tmp_path, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    preprocess = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_model(tmp_path / "run", model, tiny_cfg, preprocess, note="x")
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "run").parent.rglob("*"))
    for name in ("run", "run.safetensors", "run.json"):
        loaded, meta = load_model(tmp_path / name)
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(loaded(x), model(x))
    assert meta["preprocess"] == preprocess and meta["note"] == "x"
    assert meta["model"]["depth"] == 2


def test_run_folder_names_its_model(tmp_path, tiny_cfg):
    save_model(tmp_path / "model", build_model(tiny_cfg), tiny_cfg, {})
    model, _ = load_model(tmp_path)
    assert len(model.blocks) == 2


def test_torn_pair_is_refused(tmp_path):
    save_checkpoint(tmp_path / "a", {"w": torch.ones(3)}, {"epoch": 1})
    sidecar = (tmp_path / "a.json").read_text()
    save_checkpoint(tmp_path / "a", {"w": torch.zeros(3)}, {"epoch": 2})
    (tmp_path / "a.json").write_text(sidecar)  # as if the second save died between its two files
    with pytest.raises(LotusError, match="does not match its sidecar"):
        load_checkpoint(tmp_path / "a")


def test_not_a_lotus_sidecar(tmp_path):
    save_checkpoint(tmp_path / "a", {"w": torch.ones(3)}, {})
    (tmp_path / "a.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LotusError, match="not a LOTUS checkpoint"):
        load_checkpoint(tmp_path / "a")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(LotusError, match="nothing.safetensors not found"):
        load_checkpoint(tmp_path / "nothing")


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # the write fails midway
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a", {"w": torch.ones(1)}, {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
