"""How much of each object does each ticket selection keep? Object coverage on photographs with boxes.

Scores training images (of the training split; the validation images are held out) of a dataset
with object boxes (Tiny-ImageNet-100's boxes.tsv) once per selection: the class token's attention
in the last block, averaged over all blocks (the default), attention rollout, gradient-weighted
rollout (Chefer et al., 2021), and random; plus a control that looks at no image, the patches
nearest the centre. At each drop ratio it records the two shares of `lotus tickets --boxes` (of
the kept patches, on the object; of the object's patches, kept), also over the images whose
object covers less than half the frame, where choosing matters most. A sample of --images
images (drawn once, the same for every selection) keeps the survey to minutes; the tickets that
training uses record the same shares over the whole split (tiny_imagenet_tickets.py).

    python benchmarks/ticket_coverage.py --baseline runs/frontier/tiny-imagenet-100/baseline --data data/tiny-imagenet-100
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import ROOT, shown, tiny_imagenet_folder, write_result

from lotus.checkpoint import load_model
from lotus.coverage import box_patches, coverage_shares, keep_mask, match_boxes
from lotus.data import DataConfig, load_split_for_model
from lotus.drop import num_keep
from lotus.tickets import TicketConfig, balance_scores, keep_from_scores, make_tickets

# The selections worth trying, by the name the results use; "centre" is the control that looks at no image.
SELECTIONS = {
    "last": TicketConfig(select="attention", layers=(-1,)),
    "all": TicketConfig(select="attention", layers="all"),
    "rollout": TicketConfig(select="attention", method="rollout"),
    "grad": TicketConfig(select="attention", method="grad"),
    "balance": TicketConfig(select="attention", layers="all", balance=True),  # "all", ranked by position first
    "random": TicketConfig(select="random"),
    "centre": None,
}


def coverage(keep_idx: torch.Tensor, on_object: torch.Tensor, small: torch.Tensor) -> dict[str, float]:
    """Both shares averaged over every image with a box, and over those with a small object."""
    on_kept, kept_of_object = coverage_shares(keep_mask(keep_idx, on_object.shape[1]), on_object)
    return {
        "kept_on_object": on_kept.mean().item(),
        "object_kept": kept_of_object.mean().item(),
        "small_kept_on_object": on_kept[small].mean().item(),
        "small_object_kept": kept_of_object[small].mean().item(),
    }


def centre_scores(num_images: int, grid: int) -> torch.Tensor:
    """(num_images, N): every image's patches ranked by closeness to the centre (ties broken at random)."""
    yy, xx = torch.meshgrid(torch.arange(grid) - (grid - 1) / 2, torch.arange(grid) - (grid - 1) / 2, indexing="ij")
    near = -(yy**2 + xx**2).flatten()
    return near + 1e-3 * torch.rand(num_images, grid * grid, generator=torch.Generator().manual_seed(0))


def boxed_sample(model, pre: dict, root: Path, boxes_file: Path, images: int):
    """A fixed sample of `images` boxed training images (0 = all), as the model expects them, with
    each image's patches on the object (images, N) and which objects cover less than half of it."""
    data = load_split_for_model(DataConfig(str(root)), pre, "train")
    boxes = match_boxes(boxes_file, data)
    rows = torch.randperm(len(boxes.index), generator=torch.Generator().manual_seed(0))
    rows = rows[:images].sort().values if images else torch.arange(len(boxes.index))
    grid, patch_size = model.patch_embed.grid_size[0], model.patch_embed.patch_size[0]
    on_object = box_patches(boxes.boxes[rows], boxes.sizes[rows], grid, patch_size)
    return data.take(boxes.index[rows]), on_object, on_object.float().mean(-1) < 0.5, len(boxes.index)


def survey(
    model, pre: dict, sample, on_object: torch.Tensor, small: torch.Tensor, names: list[str], drops: list[float], device="cpu"
) -> dict:
    """Each named selection's coverage of the sample's objects at every drop ratio, and its scoring time."""
    grid = model.patch_embed.grid_size[0]
    results = {}
    for name in names:
        start = time.perf_counter()
        cfg = SELECTIONS[name]
        if cfg is None:
            scores = centre_scores(len(sample), grid)
        else:
            scores = make_tickets(model, sample, pre["mean"], pre["std"], cfg, device=device).scores
        seconds = time.perf_counter() - start
        keys = balance_scores(scores) if cfg is not None and cfg.balance else scores
        results[name] = {
            "config": asdict(cfg) if cfg else "the patches nearest the centre",
            "scoring_seconds": seconds,
            "drops": {f"{d:g}": coverage(keep_from_scores(keys, num_keep(grid * grid, d)), on_object, small) for d in drops},
        }
        shares = results[name]["drops"]
        print(
            f"{name:>8} ({seconds:4.0f} s): "
            + "  ".join(
                f"drop {d}: object kept {s['object_kept']:.3f} (small {s['small_object_kept']:.3f})" for d, s in shares.items()
            ),
            flush=True,
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=ROOT / "runs" / "frontier" / "tiny-imagenet-100" / "baseline")
    p.add_argument(
        "--data", type=Path, default=None, help="an ImageFolder root (default: Tiny-ImageNet-100, unpacked into data/ once)"
    )
    p.add_argument("--boxes", type=Path, default=None, help="the boxes.tsv (default: DATA/boxes.tsv)")
    p.add_argument("--drops", default="0.3,0.5,0.7")
    p.add_argument("--images", type=int, default=5000, help="images sampled (among those with a box); 0 = all")
    p.add_argument("--selections", default=",".join(SELECTIONS), help=f"any of {', '.join(SELECTIONS)}")
    p.add_argument("--name", default="ticket_coverage_tiny_imagenet", help="results file name")
    args = p.parse_args()
    args.data = args.data or tiny_imagenet_folder()

    model, meta = load_model(args.baseline)
    pre = meta["preprocess"]
    sample, on_object, small, with_box = boxed_sample(model, pre, args.data, args.boxes or args.data / "boxes.tsv", args.images)
    print(f"{len(sample)} images with a box; {small.float().mean().item():.1%} have an object on < half the patches")
    drops = [float(d) for d in args.drops.split(",")]
    results = survey(model, pre, sample, on_object, small, args.selections.split(","), drops)
    write_result(
        args.name,
        {
            "baseline": shown(args.baseline),
            "baseline_test_accuracy": meta["metrics"].get("test_accuracy"),
            "data": shown(args.data),
            "split": "train (validation images held out)",
            "images": len(sample),
            "images_with_box": with_box,
            "small_objects": int(small.sum()),
            "object_share": on_object.float().mean().item(),
            "grid": model.patch_embed.grid_size[0],
            "selections": results,
        },
    )


if __name__ == "__main__":
    main()
