"""Does a model fine-tuned on attention tickets lose accuracy because it never saw the patches
attention drops? Each fine-tuned model of benchmarks/tiny_imagenet_tickets.py is evaluated on the
test images seen three ways: whole; only the patches the scorer's every-block attention keeps at
the drop ratio it trained on; and only as many patches kept at random.

If attention tickets cost accuracy through a train/test mismatch (the kind of patch attention
drops is never seen in training but is always there at test time), the attention-trained model
beats the random-trained one on attention-kept views, and loses on whole images. If it is behind
on its own kind of view too, the patches attention dropped held what the model needed.

    python benchmarks/ticket_views.py                # every model the grid left in runs/
    python benchmarks/ticket_views.py --drops 0.3

Writes benchmarks/results/ticket_views_tiny_imagenet.json.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, shown, tiny_imagenet_folder, write_result

from lotus.checkpoint import load_model
from lotus.data import DataConfig, load_split_for_model, make_loader
from lotus.drop import num_keep
from lotus.tickets import TicketConfig, keep_from_scores, make_tickets

RUN = re.compile(r"(?P<selection>all|random)-(?P<drop>[0-9.]+)-seed(?P<seed>\d+)")


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, keep: torch.Tensor | None) -> float:
    """Top-1 test accuracy (percent), each image seen through its row of `keep` (None: whole)."""
    model.eval()
    correct = seen = 0
    for batch in loader:
        logits = model(batch.images, None if keep is None else keep[batch.index])
        correct += (logits.argmax(-1) == batch.labels).sum().item()
        seen += len(batch.labels)
    return 100.0 * correct / seen


def views(scorer: torch.nn.Module, data, pre: dict, drops: list[float], seed: int) -> dict[float, dict[str, torch.Tensor]]:
    """Per drop ratio, the kept patch indices of every test image: by attention and at random."""
    scores = make_tickets(scorer, data, pre["mean"], pre["std"], TicketConfig(select="attention", layers="all")).scores
    patches = scores.shape[1]
    noise = torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed))
    return {
        d: {"attention": keep_from_scores(scores, num_keep(patches, d)), "random": keep_from_scores(noise, num_keep(patches, d))}
        for d in drops
    }


def paired(rows: list[dict], view: str) -> dict[str, float] | None:
    """Attention-trained minus random-trained accuracy on `view`, paired by seed: mean and its standard error."""
    by_seed: dict[int, dict[str, float]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["selection"]] = row["accuracy"][view]
    diffs = [s["all"] - s["random"] for s in by_seed.values() if len(s) == 2]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean": statistics.fmean(diffs), "standard_error": se, "seeds": len(diffs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "frontier" / "tiny-imagenet-100" / "baseline")
    p.add_argument(
        "--data", type=Path, default=None, help="an ImageFolder root (default: Tiny-ImageNet-100, unpacked into data/ once)"
    )
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "tiny-imagenet-tickets" / "finetune-s0.5-epochs1")
    p.add_argument("--drops", default=None, help="only models trained at these drop ratios (default: every one there)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random views")
    args = p.parse_args()
    args.data = args.data or tiny_imagenet_folder()
    torch.set_grad_enabled(False)

    found = [(RUN.fullmatch(d.name), d) for d in sorted(args.runs.iterdir()) if (d / "model.safetensors").exists()]
    runs = [(m["selection"], float(m["drop"]), int(m["seed"]), d) for m, d in found if m]
    if args.drops:
        wanted = {float(d) for d in args.drops.split(",")}
        runs = [r for r in runs if r[1] in wanted]
    if not runs:
        raise SystemExit(f"no fine-tuned models in {args.runs}: run benchmarks/tiny_imagenet_tickets.py first")
    scorer, meta = load_model(args.baseline)
    pre = meta["preprocess"]
    data = load_split_for_model(DataConfig(str(args.data)), pre, "test")
    start = time.perf_counter()
    kept = views(scorer, data, pre, sorted({r[1] for r in runs}), args.seed)
    print(f"{len(data)} test images scored by {shown(args.baseline)} in {time.perf_counter() - start:.0f} s")
    loader = make_loader(data, 256, pre["mean"], pre["std"])
    rows = []
    for selection, drop, seed, folder in runs:
        model, _ = load_model(folder)
        acc = {"whole": accuracy(model, loader, None), **{v: accuracy(model, loader, k) for v, k in kept[drop].items()}}
        rows.append({"run": folder.name, "selection": selection, "drop": drop, "seed": seed, "accuracy": acc})
        print(f"{folder.name:>16}: " + "  ".join(f"{v} {a:.2f}" for v, a in acc.items()), flush=True)
    differences = {}
    for drop in sorted({r[1] for r in runs}):
        at = [r for r in rows if r["drop"] == drop]
        differences[f"{drop:g}"] = {v: paired(at, v) for v in ("whole", "attention", "random")}
        shown_diffs = {v: d for v, d in differences[f"{drop:g}"].items() if d}
        print(
            f"drop {drop:g}, attention-trained minus random-trained: "
            + "  ".join(
                f"{v} {d['mean']:+.2f} ± {d['standard_error'] or 0:.2f} ({d['seeds']} seeds)" for v, d in shown_diffs.items()
            )
        )
    write_result(
        "ticket_views_tiny_imagenet",
        {
            "baseline": shown(args.baseline),
            "data": shown(args.data),
            "split": "test",
            "views": "whole image; the patches every-block attention of the baseline keeps; as many at random",
            "runs": rows,
            "attention_minus_random": differences,
        },
    )


if __name__ == "__main__":
    main()
