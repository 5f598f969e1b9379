"""Whole training epochs on tickets against full data, side by side in one run.

Each round trains one epoch at full data and one at every drop ratio, in a shuffled order, through
`lotus.train.train` (the path `lotus train --tickets` takes: the decoded split, augmentation,
the tickets' keep indices moved with each crop, the evaluation after the epoch), so the epoch
time includes everything a user's epoch pays, loading included. A round's ratios are taken
between its own epochs, so a slow spell of the machine hits both sides of a ratio alike.

Every model is a fresh one of the same shape and seed. The tickets are random ones: a step's
cost depends on how many patches it keeps, not on which (attention tickets keep the same count
and are cut by the same code; their one scoring pass is priced in tickets_scoring_speed.py).
They are cut from the first full-data epoch's checkpoint, so round 1 runs full data first.

    python benchmarks/epoch_time.py                              # Tiny-ImageNet-100, drop 0.5, 2 rounds
    python benchmarks/epoch_time.py --patch-size 4 --rounds 1     # 256 patches: more of them background
    python benchmarks/epoch_time.py --data data/cifar10 --patch-size 4 --drops 0.3,0.5 --rounds 3

Writes benchmarks/results/epoch_time_<dataset>.json.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from common import ROOT, shown, tiny_imagenet_folder, write_result

from lotus.checkpoint import load_model
from lotus.config import TicketConfig, default_compress_config
from lotus.data import DataConfig
from lotus.drop import num_keep
from lotus.tickets import tickets_from_checkpoint
from lotus.train import train
from lotus.vit import ModelConfig


def one_epoch(args, data_cfg: DataConfig, recipe, name: str, tickets: Path | None) -> dict:
    history = train(
        data_cfg, ModelConfig(depth=args.depth, patch_size=args.patch_size), recipe, args.work / name, tickets=tickets
    )
    epoch = history[-1]
    return {key: epoch[key] for key in ("epoch_seconds", "epoch_cpu_seconds", "images_per_second", "test_accuracy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, default=None, help="an ImageFolder root (default: Tiny-ImageNet-100, unpacked into data/ once)"
    )
    p.add_argument("--drops", default="0.5")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--patch-size", type=int, default=8, help="8 gives 64-px images 64 patches, the CIFAR-10 cost")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "epoch-time")
    args = p.parse_args()
    args.data = args.data or tiny_imagenet_folder()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"{args.data} has no train/ folder: pass --data, the root of an ImageFolder")
    data_cfg = DataConfig(str(args.data))
    recipe = replace(default_compress_config(data_cfg.name).finetune, epochs=1, warmup_epochs=0.5, seed=0)
    drops = [float(d) for d in args.drops.split(",")]
    settings = ["full"] + [f"drop {d:g}" for d in drops]
    tickets: dict[str, Path] = {}
    rounds = []
    shutil.rmtree(args.work, ignore_errors=True)  # this benchmark's own scratch runs: each epoch starts afresh
    for r in range(args.rounds):
        order = settings[1:]
        random.Random(r).shuffle(order)
        order.insert(0 if r == 0 else random.Random(r).randrange(len(order) + 1), "full")
        epochs = {}
        for setting in order:
            name = f"round{r}-{setting.replace(' ', '')}"
            epochs[setting] = one_epoch(args, data_cfg, recipe, name, tickets.get(setting))
            print(f"round {r + 1}/{args.rounds} {setting}: {epochs[setting]['epoch_seconds']:.0f} s", flush=True)
            if not tickets:  # the first full-data epoch gives the checkpoint the tickets are cut from
                for d in drops:
                    cfg = TicketConfig(drop=d, select="random")
                    tickets[f"drop {d:g}"] = args.work / f"tickets-{d:g}"
                    tickets_from_checkpoint(args.work / name, data_cfg, cfg, tickets[f"drop {d:g}"])
        rounds.append({"order": order, "epochs": epochs})
    model = load_model(args.work / "round0-full")[1]["model"]
    patches = (model["img_size"] // model["patch_size"]) ** 2
    summary = {}
    for setting, drop in zip(settings, [0.0, *drops]):
        walls = [r["epochs"][setting]["epoch_seconds"] / r["epochs"]["full"]["epoch_seconds"] for r in rounds]
        cpus = [r["epochs"][setting]["epoch_cpu_seconds"] / r["epochs"]["full"]["epoch_cpu_seconds"] for r in rounds]
        summary[setting] = {
            "patches_kept": num_keep(patches, drop),
            "epoch_seconds": statistics.median(r["epochs"][setting]["epoch_seconds"] for r in rounds),
            "vs_full_wall": statistics.median(walls),
            "vs_full_cpu": statistics.median(cpus),
            "vs_full_wall_per_round": walls,
        }
        print(
            f"{setting}: {summary[setting]['vs_full_wall']:.3f}x the wall time of a full epoch, {summary[setting]['vs_full_cpu']:.3f}x its CPU time"
        )
    write_result(
        f"epoch_time_{args.data.name.replace('-', '_')}",
        {
            "data": shown(args.data),
            "model": model,
            "recipe": asdict(recipe),
            "rounds": rounds,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
