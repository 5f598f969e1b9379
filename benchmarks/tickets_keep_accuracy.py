"""Are the ticket scores right? A trained model's test accuracy when it sees only some patches.

For each drop ratio, the model classifies every test image from K of its patches only (the
token-gathering forward), the K chosen four ways: the K highest-scored by the model's own
attention (what tickets keep), the highest spread over 2x2 blocks of patches (`--spread 2`),
K at random, and the K lowest-scored (what tickets drop). If attention scores find the
informative patches, "highest" holds up best and "lowest" falls furthest. This separates the
scores from the training question (does training on the kept patches from scratch generalise to
whole images), which cifar10_tickets.py measures.

    python benchmarks/tickets_keep_accuracy.py --checkpoint runs/gpu/baseline [--drops 0.3,0.5,0.7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ROOT, SHARED_CIFAR, cifar10_folder, write_result

from lotus.checkpoint import load_model
from lotus.data import BatchLoader, DataConfig, load_split_for_model
from lotus.drop import num_keep
from lotus.tickets import TicketConfig, keep_from_scores, parse_layers, score_batch, select_keep


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "gpu" / "baseline")
    p.add_argument("--drops", default="0.1,0.3,0.5,0.7")
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--method", default="cls", choices=["cls", "rollout"], help="attention scoring (see lotus tickets)")
    p.add_argument("--layers", default="all", help="blocks scored, e.g. '-1' or '2'")
    args = p.parse_args()

    model, meta = load_model(args.checkpoint)
    pre = meta["preprocess"]
    data = load_split_for_model(DataConfig(str(cifar10_folder(args.archive))), pre, "test")
    drops = [float(d) for d in args.drops.split(",")]
    layers = parse_layers(args.layers)
    scoring = TicketConfig(select="attention", method=args.method, layers=layers)  # the tickets' scoring, sink corrections on
    n = model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(0)
    correct = {"full": 0, **{f"{how}-{d:g}": 0 for d in drops for how in ("highest", "spread", "random", "lowest")}}
    for batch in BatchLoader(data, args.batch_size, pre["mean"], pre["std"]):
        scores, _ = score_batch(model, batch.images, scoring)
        correct["full"] += (model(batch.images).argmax(-1) == batch.labels).sum().item()
        for d in drops:
            k = num_keep(n, d)
            choices = {
                "highest": keep_from_scores(scores, k),
                "lowest": keep_from_scores(-scores, k),
                "spread": select_keep(scores, k, model.patch_embed.grid_size[0], 2),
                "random": keep_from_scores(torch.rand(scores.shape, generator=gen), k),
            }
            for how, keep in choices.items():
                correct[f"{how}-{d:g}"] += (model(batch.images, keep).argmax(-1) == batch.labels).sum().item()
    accuracy = {name: 100.0 * c / len(data) for name, c in correct.items()}
    print(f"whole images: {accuracy['full']:.2f}%")
    print(f"{'drop':>5} " + " ".join(f"{how:>8}" for how in ("highest", "spread", "random", "lowest")))
    for d in drops:
        print(f"{d:>5g} " + " ".join(f"{accuracy[f'{how}-{d:g}']:>8.2f}" for how in ("highest", "spread", "random", "lowest")))
    name = (
        "tickets_keep_accuracy"
        + (f"_{args.method}" if args.method != "cls" else "")
        + (f"_layers{args.layers}" if layers else "")
    )
    write_result(
        name,
        {
            "checkpoint": str(args.checkpoint),
            "method": args.method,
            "layers": layers,
            "test_images": len(data),
            "accuracy": accuracy,
        },
    )


if __name__ == "__main__":
    main()
