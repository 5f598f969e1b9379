"""Training: the schedule, learning, exact resume, and refusing to overwrite a run."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lotus import LotusError
from lotus.data import DataConfig
from lotus.train import TrainConfig, evaluate_checkpoint, lr_at, mixing, train
from lotus.vit import ModelConfig

DATA = DataConfig("digits", img_size=16)
MODEL = ModelConfig(depth=1, drop_path_rate=0.1)
FAST = TrainConfig(epochs=3, batch_size=64, lr=1e-3, warmup_epochs=0.5, seed=1)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(1e-5, abs=1e-6)
    assert lr_at(55, 100, 10, 1e-3, 0.0) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 0.5)))


def test_training_learns_and_writes_its_run(tmp_path):
    history = train(DATA, MODEL, FAST, tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["test_accuracy"] > 40  # 10 classes: chance is 10%
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    result = evaluate_checkpoint(tmp_path, DataConfig("digits"))
    assert result["accuracy"] == pytest.approx(history[-1]["test_accuracy"])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["preprocess"]["img_size"] == 16 and len(meta["preprocess"]["mean"]) == 3


def test_a_centre_crop_is_recorded_evaluated_with_and_kept_by_fine_tuning(tmp_path):
    """--crop-pct: the checkpoint records it, evaluation reads its test images cut so, and a run
    fine-tuned from it keeps it unless told otherwise."""
    one = replace(FAST, epochs=1)
    history = train(replace(DATA, crop_pct=0.875), MODEL, one, tmp_path / "base")
    pre = json.loads((tmp_path / "base" / "model.json").read_text())["preprocess"]
    assert pre["crop_pct"] == 0.875 and "shorter side to 18, centre 16 x 16" in pre["resize"]
    assert evaluate_checkpoint(tmp_path / "base", DataConfig("digits"))["accuracy"] == history[-1]["test_accuracy"]
    train(DATA, MODEL, one, tmp_path / "tuned", init_checkpoint=tmp_path / "base")
    assert json.loads((tmp_path / "tuned" / "model.json").read_text())["preprocess"]["crop_pct"] == 0.875
    whole = train(DATA, MODEL, one, tmp_path / "whole")
    assert json.loads((tmp_path / "whole" / "model.json").read_text())["preprocess"]["crop_pct"] is None
    assert history[-1]["test_loss"] != whole[-1]["test_loss"]  # the same weights, other test pixels


def same_metrics(a: list[dict], b: list[dict]) -> bool:
    keys = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")  # not the timings
    return [[h[k] for k in keys] for h in a] == [[h[k] for k in keys] for h in b]


def test_mixup_and_cutmix_mix_images_and_labels_alike_and_the_same_way_at_each_step():
    """timm's Mixup and CutMix: each image is paired with its mirror in the batch, and its own
    label keeps the share of it that is left; a step mixes the same way every time it is run."""
    mix = mixing(TrainConfig(mixup=0.8, cutmix=1.0, seed=3), num_classes=8, rank=0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    x0, numpy_state = x.clone(), np.random.get_state()[1].copy()
    kinds = set()
    for step in range(12):
        mixed, targets = mix(x, y, step)
        lam = targets[0, 0].item()  # image 0's own label
        assert torch.allclose(targets, lam * F.one_hot(y, 8) + (1 - lam) * F.one_hot(y.flip(0), 8))
        if torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6):
            kinds.add("mixup")
        else:  # a box of the mirror image pasted in, its area the mirror's label share
            own = (mixed == x).all(1, keepdim=True)
            assert torch.equal(mixed, torch.where(own, x, x.flip(0))) and own[0].float().mean() == pytest.approx(lam)
            kinds.add("cutmix")
        again = mix(x, y, step)
        assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)
    assert kinds == {"mixup", "cutmix"} and torch.equal(x, x0)  # both kinds drawn; the batch itself untouched
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # numpy's global generator left as it was
    odd = mix(x[:7], y[:7], 0)  # timm needs pairs: an odd (last) batch trains unmixed
    assert torch.equal(odd[0], x[:7]) and torch.equal(odd[1], y[:7])


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [FAST, replace(FAST, mixup=0.8, cutmix=1.0)], ids=["plain", "mixup"])
def test_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, cfg):
    straight = train(DATA, MODEL, cfg, tmp_path / "straight")

    import lotus.train as T

    real_save = T.save_checkpoint

    def save_then_die(*args, **kwargs):  # killed right after epoch 1's state reached the disk
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(DATA, MODEL, cfg, tmp_path / "resumed")
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1

    resumed = train(DATA, MODEL, cfg, tmp_path / "resumed", resume=True)
    assert same_metrics(resumed, straight)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    train(DATA, MODEL, TrainConfig(**{**FAST.__dict__, "epochs": 1}), tmp_path)
    with pytest.raises(LotusError, match="other settings"):
        train(DATA, MODEL, TrainConfig(**{**FAST.__dict__, "epochs": 1, "lr": 0.1}), tmp_path, resume=True)


def test_a_run_started_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """Upgrading LOTUS mid-run: a setting added since the run started counts at its default
    (the behaviour the run had), and only another value of it is other settings."""
    one = replace(FAST, epochs=1)
    train(DATA, MODEL, one, tmp_path)
    state = tmp_path / "train_state.json"
    saved = json.loads(state.read_text())
    for key, name in (("data", "crop_pct"), ("preprocess", "crop_pct"), ("train", "mixup")):
        del saved["run"][key][name]
    state.write_text(json.dumps(saved))
    assert len(train(DATA, MODEL, one, tmp_path, resume=True)) == 1  # resumed, finished already
    with pytest.raises(LotusError, match="other settings"):
        train(DATA, MODEL, replace(one, mixup=0.8), tmp_path, resume=True)


def test_a_finished_run_is_not_overwritten(tmp_path):
    train(DATA, MODEL, TrainConfig(**{**FAST.__dict__, "epochs": 1}), tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(LotusError, match="already holds a training run"):
        train(DATA, MODEL, TrainConfig(**{**FAST.__dict__, "epochs": 1}), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_drop_aware_training_keeps_the_patches_the_exported_graph_keeps(tmp_path, monkeypatch):
    """Each step runs the graph's own selection: blocks up to the select block see every patch,
    the later ones the K that block's class-token attention keeps, at each drop ratio in turn."""
    from lotus.vit import TokenGatherViT

    calls = []
    real = TokenGatherViT.forward_dropping
    monkeypatch.setattr(
        TokenGatherViT, "forward_dropping", lambda self, x, k, block: calls.append((k, block)) or real(self, x, k, block)
    )
    model = ModelConfig(depth=4, drop_path_rate=0.0)
    cfg = TrainConfig(epochs=1, batch_size=256, lr=1e-3, warmup_epochs=0.1, drop_aware=(0.5, 0.25))
    seen = []

    def count(module, args, output):
        seen.append(output.shape[1])

    import lotus.train

    real_fit = lotus.train.fit

    def fit_with_hooks(model_, *args, **kwargs):
        model_.blocks[3].register_forward_hook(count)
        return real_fit(model_, *args, **kwargs)

    monkeypatch.setattr(lotus.train, "fit", fit_with_hooks)
    history = train(DATA, model, cfg, tmp_path)
    steps = 1365 // 256  # the last partial batch is dropped
    assert calls[:steps] == [(8, 0), (12, 0)] * (steps // 2) + [(8, 0)] * (steps % 2)  # 16 patches, block 4 // 6 = 0
    assert seen[:steps] == [9, 13] * (steps // 2) + [9] * (steps % 2)  # the class token and the K kept
    assert history[-1]["test_accuracy"] is not None  # evaluation sees every patch
    with pytest.raises(LotusError, match="--drop-aware and --tickets"):
        train(DATA, model, cfg, tmp_path / "t", tickets=tmp_path)
    with pytest.raises(LotusError, match="--drop-aware \\[1.5\\]"):
        TrainConfig(drop_aware=(1.5,))


def digit_test_batches(pre: dict):
    from lotus.data import load_split_for_model, make_loader

    return make_loader(load_split_for_model(DATA, pre, "test"), 256, pre["mean"], pre["std"])


def predictions(checkpoint) -> torch.Tensor:
    """A checkpoint's predicted class for every test image of DATA."""
    from lotus.checkpoint import load_model

    model, meta = load_model(checkpoint)
    with torch.inference_mode():
        return torch.cat([model(batch.images).argmax(-1) for batch in digit_test_batches(meta["preprocess"])])


def test_distillation_teaches_the_teachers_predictions(tmp_path):
    """A student taught only by a teacher (--distill-weight 1) learns what the teacher predicts,
    not the labels: a teacher that names every digit's successor makes a student that does too."""
    from lotus.checkpoint import load_model, save_model

    train(DATA, MODEL, FAST, tmp_path / "base")
    model, meta = load_model(tmp_path / "base")
    with torch.no_grad():  # logit c now scores what class c - 1 did: the teacher predicts each digit plus one
        model.head.weight.copy_(model.head.weight.roll(1, 0))
        model.head.bias.copy_(model.head.bias.roll(1, 0))
    save_model(tmp_path / "teacher", model, ModelConfig(**meta["model"]), meta["preprocess"])
    teacher = predictions(tmp_path / "teacher")
    labels = torch.cat([b.labels for b in digit_test_batches(meta["preprocess"])])
    assert (teacher == (labels + 1) % 10).float().mean() > 0.3  # the base model is right on ~45%

    taught = train(DATA, MODEL, replace(FAST, distill=str(tmp_path / "teacher"), distill_weight=1.0), tmp_path / "student")
    student = predictions(tmp_path / "student")
    assert (student == teacher).float().mean() > 0.6  # chance: 10%
    assert taught[-1]["test_accuracy"] < 15  # against the true labels: it learned the teacher's shift
    assert json.loads((tmp_path / "student" / "model.json").read_text())["train"]["distill"] == str(tmp_path / "teacher")

    plain = train(DATA, MODEL, FAST, tmp_path / "plain")
    unweighted = train(DATA, MODEL, replace(FAST, distill=str(tmp_path / "teacher"), distill_weight=0.0), tmp_path / "w0")
    assert same_metrics(unweighted, plain)  # weight 0: the teacher runs but teaches nothing, and disturbs nothing


def test_a_teacher_that_reads_other_input_or_classes_is_refused_before_the_run_starts(tmp_path):
    from lotus.checkpoint import load_model, save_model

    train(DATA, MODEL, replace(FAST, epochs=1), tmp_path / "base")
    model, meta = load_model(tmp_path / "base")
    pre = meta["preprocess"]
    save_model(tmp_path / "other-mean", model, ModelConfig(**meta["model"]), {**pre, "mean": [0.5, 0.5, 0.5]})
    save_model(tmp_path / "other-classes", model, ModelConfig(**meta["model"]), {**pre, "classes": [f"c{i}" for i in range(10)]})
    for teacher, message in [("other-mean", "reads its input otherwise"), ("other-classes", "predicts other classes")]:
        cfg = replace(FAST, distill=str(tmp_path / teacher))
        with pytest.raises(LotusError, match=message):
            train(DATA, MODEL, cfg, tmp_path / f"run-{teacher}")
        assert not (tmp_path / f"run-{teacher}").exists()  # nothing made before the refusal
