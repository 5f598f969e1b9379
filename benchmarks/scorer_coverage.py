"""Does a better-trained scorer find more of the object? Object coverage as the scorer trains.

Attention tickets lost to random drop on Tiny-ImageNet-100 with a scorer trained 3 epochs (22%
test accuracy) whose every-block attention kept 54.5% of the object's patches at drop 0.5, random
50%. This trains a baseline of the same shape for longer (`lotus train`'s path, --epochs with its
cosine schedule), keeps the state each epoch ends with, and measures, for the scorer as it stood
after each epoch: its validation accuracy, and how much of the object each selection keeps at
--drops (ticket_coverage.py's survey, on one fixed sample of boxed training images). If coverage
climbs with accuracy, a better-trained scorer is the lever; if it stays flat, attention on these
photographs does not single out the object at any accuracy this budget reaches.

    python benchmarks/scorer_coverage.py --epochs 8
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch
from common import ROOT, shown, tiny_imagenet_folder, write_result
from ticket_coverage import SELECTIONS, boxed_sample, survey

from lotus.checkpoint import load_checkpoint, load_model
from lotus.config import TrainConfig
from lotus.data import DataConfig, load_split_for_model, make_loader
from lotus.device import resolve_device
from lotus.train import STATE_FILE, evaluate, train
from lotus.vit import ModelConfig


def keep_epoch_states(run: Path, snapshots: Path):
    """A progress callback that, at the first step of each epoch, copies the state the epoch before
    saved (its sidecar names the epoch) as snapshots/epoch-E.*; the last epoch's is the model."""
    state = run / f"{STATE_FILE}.json"

    def progress(label: str, done: int, total: int | None, status: str) -> None:
        if done != 1 or not state.exists():
            return
        finished = json.loads(state.read_text())["epoch"]
        if not (snapshots / f"epoch-{finished}.json").exists():
            snapshots.mkdir(parents=True, exist_ok=True)
            for suffix in (".safetensors", ".json"):
                shutil.copyfile(run / f"{STATE_FILE}{suffix}", snapshots / f"epoch-{finished}{suffix}")

    return progress


def scorer_at(final: torch.nn.Module, snapshot: Path) -> torch.nn.Module:
    """The model as it stood at `snapshot` (a saved training state): a copy of `final` with its weights."""
    tensors, _ = load_checkpoint(snapshot)
    model = copy.deepcopy(final)
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, default=None, help="an ImageFolder root (default: Tiny-ImageNet-100, unpacked into data/ once)"
    )
    p.add_argument("--boxes", type=Path, default=None, help="the boxes.tsv (default: DATA/boxes.tsv)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--measure", default="", help="epochs to measure, e.g. 1,2,4,8 (default: every epoch)")
    p.add_argument("--drops", default="0.5")
    p.add_argument("--images", type=int, default=5000, help="boxed training images sampled; 0 = all")
    p.add_argument("--selections", default="last,all,rollout,grad,random,centre", help=f"any of {', '.join(SELECTIONS)}")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "scorer-coverage")
    p.add_argument("--name", default="scorer_coverage_tiny_imagenet", help="results file name")
    args = p.parse_args()
    args.data = args.data or tiny_imagenet_folder()

    data_cfg = DataConfig(str(args.data))
    run, snapshots = args.work / f"baseline-{args.epochs}", args.work / f"states-{args.epochs}"
    if not (run / "model.json").exists():
        model_cfg = ModelConfig(patch_size=args.patch_size, depth=args.depth)
        train(data_cfg, model_cfg, TrainConfig(epochs=args.epochs), run, resume=True, progress=keep_epoch_states(run, snapshots))
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [int(e) for e in args.measure.split(",")] if args.measure else list(range(1, args.epochs + 1))
    drops = [float(d) for d in args.drops.split(",")]
    model, meta = load_model(run)
    pre = meta["preprocess"]
    device = resolve_device("auto")  # scoring and evaluation on the GPU where there is one
    val_loader = make_loader(load_split_for_model(data_cfg, pre, "val"), 256, pre["mean"], pre["std"])
    sample, on_object, small, _ = boxed_sample(model, pre, args.data, args.boxes or args.data / "boxes.tsv", args.images)
    rows = []
    for epoch in epochs:
        scorer = model if epoch == args.epochs else scorer_at(model, snapshots / f"epoch-{epoch}")
        val = evaluate(scorer.to(device), val_loader, device)["accuracy"]
        print(f"epoch {epoch}: validation accuracy {val:.2f}%", flush=True)
        rows.append(
            {
                "epoch": epoch,
                "val_accuracy": val,
                "test_accuracy": history[epoch - 1]["test_accuracy"],
                "selections": survey(scorer, pre, sample, on_object, small, args.selections.split(","), drops, device),
            }
        )
    write_result(
        args.name,
        {
            "data": shown(args.data),
            "split": "coverage on train (validation images held out); accuracy on validation and test",
            "baseline": shown(run),
            "train": meta["train"],
            "model": meta["model"],
            "images": len(sample),
            "small_objects": int(small.sum()),
            "object_share": on_object.float().mean().item(),
            "epochs": rows,
        },
    )


if __name__ == "__main__":
    main()
