"""Train the default LOTUS model (ViT-Tiny shape, patch 4) on CIFAR-10 from ../shared.

Records test accuracy after every epoch and training images/s (docs/results.md renders them).
The budget is an argument: an epoch takes about 13 min on 2 CPU cores.

    python benchmarks/cifar10_baseline.py --epochs 3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from common import ROOT, SHARED_CIFAR, cifar10_folder, write_result

from lotus.data import DataConfig
from lotus.train import TrainConfig, train
from lotus.vit import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument(
        "--data", type=Path, default=None, help="another ImageFolder root (e.g. cluttered_cifar10.py's) instead of the archive"
    )
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cifar10-baseline")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--name", default="cifar10_baseline", help="result file name (benchmarks/results/NAME.json)")
    args = p.parse_args()

    root = args.data or cifar10_folder(args.archive)
    cfg = TrainConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs)
    start = time.perf_counter()
    model_cfg = ModelConfig(patch_size=args.patch_size)  # img_size: the data's
    history = train(DataConfig(str(root)), model_cfg, cfg, args.out, resume=args.resume)
    write_result(
        args.name,
        {
            "data": str(root),
            "model": f"vit_tiny_patch16_224 shape, patch {args.patch_size}, depth 12",
            "train": asdict(cfg),
            "checkpoint": str(args.out),
            "wall_seconds": time.perf_counter() - start,
            "epochs": history,
        },
    )
    for h in history:
        print(
            f"epoch {h['epoch']}: test {h['test_accuracy']:.2f}%  {h['images_per_second']:.0f} img/s  {h['epoch_seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()
