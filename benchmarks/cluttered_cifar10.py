"""CIFAR-10 in clutter: each CIFAR-10 image pasted at a random spot on a 64x64 canvas of pieces of
other images, written as an ImageFolder, for a test of data lottery tickets that CIFAR-10 cannot give.

CIFAR-10's objects fill their 32x32 images, so any half of an image holds most of its object and
random tickets see nearly what attention tickets see. Here the object is a quarter of the canvas
(16 to 25 of its 64 patches of 8px) and the rest is 16x16 crops of other images of the split (of
other classes, mostly), as in cluttered MNIST (Mnih et al., 2014): dropping background is what
attention tickets should do better than random ones, if the method works.

    python benchmarks/cluttered_cifar10.py --out data/cluttered64        # train/ and test/, placements.npz
    python benchmarks/cluttered_cifar10.py --out data/cluttered64 --coverage DIR [DIR ...]

The data folder also gets `boxes.tsv`, the object's box in every image, so `lotus tickets --boxes`
measures tickets made on it (lotus.coverage: a patch the box touches is the object's).

--coverage reads tickets made on the cluttered training split and reports, for each, the share
of its kept patches that lie on the object and the share of the object's patches it keeps. Here
a patch is the object's when the object covers at least half of it (`lotus.coverage.box_patches`
with min_cover 0.5), and the second share is pooled over all images, as the published figures were.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import ROOT, SHARED_CIFAR, cifar10_folder, write_result
from PIL import Image

from lotus.config import class_folders
from lotus.coverage import box_patches, keep_mask, write_boxes
from lotus.data import DataConfig, holdout_positions, load_split
from lotus.tickets import load_tickets

CANVAS = 64  # canvas side in pixels
CELL = 16  # side of each background crop
PATCH = 8  # the patch side the benchmark trains with: 64 patches, as many as CIFAR-10 at patch 4


def clutter(images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Each (3, 32, 32) image pasted on a canvas tiled with random crops of random images of `images`.

    Returns the (N, 3, CANVAS, CANVAS) uint8 canvases and the (N, 2) (y, x) pixel offset of each object.
    """
    n, side = len(images), images.shape[-1]
    cells = CANVAS // CELL
    windows = images.unfold(2, CELL, 1).unfold(3, CELL, 1)  # (N, 3, side-CELL+1, side-CELL+1, CELL, CELL), a view
    canvas = torch.empty(n, 3, CANVAS, CANVAS, dtype=torch.uint8)
    for row in range(cells):
        for col in range(cells):
            src = torch.from_numpy(rng.integers(0, n, n))
            y, x = (torch.from_numpy(rng.integers(0, side - CELL + 1, n)) for _ in range(2))
            crops = windows[src, :, y, x]  # (N, 3, CELL, CELL)
            canvas[:, :, row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = crops
    offsets = rng.integers(0, CANVAS - side + 1, (n, 2))
    for i, (y, x) in enumerate(offsets):
        canvas[i, :, y : y + side, x : x + side] = images[i]
    return canvas, offsets


def object_boxes(offsets: np.ndarray, side: int = 32) -> torch.Tensor:
    """(N, 4) int64 x0, y0, x1, y1 (inclusive) of each object placed at (y, x) `offsets`."""
    y, x = torch.from_numpy(offsets).long().unbind(-1)
    return torch.stack([x, y, x + side - 1, y + side - 1], -1)


def object_patches(offsets: np.ndarray, side: int = 32, min_overlap: float = 0.5) -> np.ndarray:
    """(N, G*G) bool: the patches at least `min_overlap` covered by each image's object."""
    sizes = torch.full((len(offsets), 2), CANVAS)
    return box_patches(object_boxes(offsets, side), sizes, CANVAS // PATCH, PATCH, min_overlap).numpy()


def make(source: Path, out: Path, seed: int, limit: int | None) -> None:
    placements, boxes = {}, []
    for split_seed, split in enumerate(("train", "test")):
        data = load_split(DataConfig(str(source), val_fraction=0), split)  # the whole stored split: nothing held out
        rng = np.random.default_rng([seed, split_seed])
        pick = torch.from_numpy(np.sort(rng.permutation(len(data))[:limit]))  # sorted, the picks keep the loader's order
        images, labels = data.images[pick], data.labels[pick]
        canvas, offsets = clutter(images, rng)
        names = [f"{i:05d}.png" for i in range(len(labels))]
        for name in data.classes:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        paths = [out / split / data.classes[label] / name for label, name in zip(labels.tolist(), names)]
        pixels = canvas.permute(0, 2, 3, 1).numpy()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda pixel, path: Image.fromarray(pixel).save(path), pixels, paths, chunksize=512))
        # in the order the ImageFolder loader reads them: by class, then by file name
        placements[split] = offsets[np.argsort(labels.numpy(), kind="stable")]
        boxes += [
            (split, path.relative_to(out).as_posix(), tuple(box)) for path, box in zip(paths, object_boxes(offsets).tolist())
        ]
        print(f"{split}: {len(paths)} images in {out / split}")
    np.savez(out / "placements.npz", **placements)
    write_boxes(out / "boxes.tsv", boxes)


def training_positions(out: Path, fraction: float) -> np.ndarray:
    """Positions in out/train (in the loader's order) of the images a training split takes when
    `fraction` of each class is held out for validation (as lotus.data holds them out)."""
    counts = [sum(1 for _ in (out / "train" / name).iterdir()) for name in class_folders(out / "train")]
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    keep = np.ones(len(labels), dtype=bool)
    if fraction:
        keep[holdout_positions(labels, fraction).numpy()] = False
    return np.flatnonzero(keep)


def coverage(out: Path, tickets_dirs: list[Path]) -> None:
    placed = object_patches(np.load(out / "placements.npz")["train"])  # (N, 64), every stored training image
    rows = {}
    for path in tickets_dirs:
        tickets = load_tickets(path)
        # the tickets cover the training split, which is the stored one less the validation images held out
        on_object = placed[training_positions(out, (tickets.meta.get("holdout") or {}).get("fraction", 0.0))]
        keep = tickets.keep_idx.numpy()  # (N, K)
        if keep.shape[0] != len(on_object) or tickets.patch_size != PATCH:
            raise SystemExit(
                f"{path} holds tickets of {keep.shape[0]} images at patch {tickets.patch_size}, "
                f"not of the {len(on_object)} in {out} at patch {PATCH}"
            )
        kept_on_object = on_object & keep_mask(torch.from_numpy(keep), on_object.shape[1]).numpy()
        rows[path.name] = {
            "num_keep": keep.shape[1],
            "kept_on_object": float(kept_on_object.sum() / keep.size),  # share of kept patches on the object
            "object_kept": float(kept_on_object.sum() / on_object.sum()),  # share of object patches kept (pooled)
            "config": tickets.meta.get("config"),
        }
        print(
            f"{path.name:>40}: K {keep.shape[1]}, kept patches on the object {rows[path.name]['kept_on_object']:.1%}, "
            f"object patches kept {rows[path.name]['object_kept']:.1%}"
        )
    print(f"{'(the object)':>40}: {placed.mean():.1%} of all patches")
    write_result("cluttered64_coverage", {"object_share": float(placed.mean()), "tickets": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR, help="the CIFAR-10 ImageFolder archive")
    p.add_argument("--out", type=Path, default=ROOT / "data" / "cluttered64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only N images of each split, drawn at random (a quick check)")
    p.add_argument("--coverage", type=Path, nargs="+", default=None, help="tickets folders to measure against the placements")
    args = p.parse_args()
    if args.coverage:
        return coverage(args.out, args.coverage)
    make(cifar10_folder(args.archive), args.out, args.seed, args.limit)


if __name__ == "__main__":
    main()
