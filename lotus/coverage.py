"""Object coverage of a patch selection: how much of what a selection keeps lies on the object,
and how much of the object it keeps.

Datasets such as Tiny-ImageNet give each image's object box in `boxes.tsv` at the dataset root:
one tab-separated line per image, `split  path  x0  y0  x1  y1`, the path relative to the root
and the box in the image's own pixels, corners inclusive (an optional first line names the
columns). The boxes are matched to a split's images by split and path (`val` counts as `test`,
as the ImageFolder loader reads a val/ folder as the test split).

The patch grid is at the model's input size, and every image is resized to that square, so a
box is scaled with its image: its pixels x0..x1 cover [x0, x1 + 1) of the image's width W, which
is [x0 * S / W, (x1 + 1) * S / W) of the input's side S (the same for y and the height). A patch
belongs to the object (it *touches* the box) when the two overlap with positive area: at the
native size, the box shares at least one pixel with the patch, so a box ending at pixel 7 touches
the first 8-pixel patch only and one starting at pixel 8 the second only; once resized, the
scaled box reaches at least one of the patch's input pixels. The comparison is done in integers,
so boxes on a patch border are exact.

Two shares per image, averaged over the images that have a box:

- `kept_on_object`: of the patches kept, the share that touch the box;
- `object_kept`: of the patches that touch the box, the share kept.

`object_share` (the share of all patches that touch the box) is what a random selection scores
on `kept_on_object`, on average.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lotus.config import boxes_missing
from lotus.data import ImageData
from lotus.errors import LotusError

BOXES_COLUMNS = ("split", "path", "x0", "y0", "x1", "y1")
SPLIT_ALIASES = {"val": "test"}  # the ImageFolder loader reads val/ as the test split

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the image's own pixels, inclusive


def read_boxes(path: str | Path) -> dict[tuple[str, str], Box]:
    """{(split, path): box} from a boxes file; a missing file or a malformed line is a one-line error."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise boxes_missing(path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LotusError(f"cannot read boxes file {path}: {e}") from None
    boxes = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if not line.strip() or (number == 1 and tuple(fields) == BOXES_COLUMNS):
            continue
        split, rel, box = _parse_line(fields, f"{path}:{number}")
        boxes[SPLIT_ALIASES.get(split, split), rel] = box
    return boxes


def _parse_line(fields: list[str], where: str) -> tuple[str, str, Box]:
    if len(fields) != 6:
        raise LotusError(f"{where}: {len(fields)} tab-separated fields, not 6 (split, path, x0, y0, x1, y1)")
    try:
        x0, y0, x1, y1 = (int(v) for v in fields[2:])
    except ValueError:
        raise LotusError(f"{where}: the box {' '.join(fields[2:])!r} is not four whole numbers x0 y0 x1 y1") from None
    if not 0 <= x0 <= x1 or not 0 <= y0 <= y1:
        raise LotusError(f"{where}: ({x0}, {y0}, {x1}, {y1}) is not a box: it needs 0 <= x0 <= x1 and 0 <= y0 <= y1")
    return fields[0], fields[1], (x0, y0, x1, y1)


def write_boxes(path: str | Path, entries: Iterable[tuple[str, str, Box]]) -> Path:
    """Write (split, path, box) entries as a boxes file that `read_boxes` reads."""
    lines = ["\t".join(BOXES_COLUMNS)] + ["\t".join([split, rel, *map(str, box)]) for split, rel, box in entries]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ImageBoxes:
    """The object boxes of one split's images (those that have one)."""

    index: torch.Tensor  # (M,) int64 position in the split of each image with a box
    boxes: torch.Tensor  # (M, 4) int64 x0, y0, x1, y1 in the image's own pixels, inclusive
    sizes: torch.Tensor  # (M, 2) int64 (width, height) of the image in its own pixels
    without_box: int  # images of the split the file gives no box

    def at_input(self, index: torch.Tensor, img_size: int) -> torch.Tensor:
        """(n, 4) float boxes of the split's images `index` at the model's input, as the half-open
        region [x0, x1) x [y0, y1) in input pixels; rows of NaN for images without a box."""
        out = torch.full((len(index), 4), float("nan"))
        row = {i: r for r, i in enumerate(self.index.tolist())}
        for n, i in enumerate(index.tolist()):
            if i in row:
                x0, y0, x1, y1 = self.boxes[row[i]].tolist()
                width, height = self.sizes[row[i]].tolist()
                sx, sy = img_size / width, img_size / height
                out[n] = torch.tensor([x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy])
        return out


def match_boxes(path: str | Path, data: ImageData) -> ImageBoxes:
    """The boxes of `data`'s images, matched by split and path relative to the dataset root.

    Raises:
        LotusError: the file is missing or malformed, the data has no image files (digits,
            torchvision's CIFAR-10), the images are cut (`crop_pct`), the file names none of the
            split's images (the boxes of another dataset), or a box reaches outside its image.
    """
    if data.files is None:
        raise LotusError(f"--boxes needs an ImageFolder dataset (its lines name image files): {data.name} has no files")
    if data.crop_pct is not None:
        raise LotusError(
            f"--boxes measures patches of whole images, but this model's {data.split} images are cut as timm evaluates "
            f"(crop_pct {data.crop_pct:g}): measure a model trained without --crop-pct"
        )
    boxes = read_boxes(path)
    found = [(i, boxes[data.split, rel]) for i, rel in enumerate(data.files) if (data.split, rel) in boxes]
    if not found:
        raise LotusError(
            f"boxes file {path} names none of the {len(data)} {data.split} images of {data.name} "
            f"(such as {data.files[0]}, split {data.split}): pass the boxes file of this dataset"
        )
    index = torch.tensor([i for i, _ in found], dtype=torch.long)
    result = ImageBoxes(
        index, torch.tensor([box for _, box in found], dtype=torch.long), data.image_sizes()[index], len(data) - len(found)
    )
    outside = (result.boxes[:, 2:] >= result.sizes).any(-1)
    if outside.any():
        i = int(outside.nonzero()[0])
        width, height = result.sizes[i].tolist()
        raise LotusError(
            f"boxes file {path}: the box {tuple(result.boxes[i].tolist())} of {data.files[int(index[i])]} reaches outside "
            f"its {width}x{height} image: is it the boxes file of another copy of this dataset?"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Pure maths on boxes and keep masks


def box_patches(boxes: torch.Tensor, sizes: torch.Tensor, grid: int, patch_size: int, min_cover: float = 0.0) -> torch.Tensor:
    """Which patches of the model's input grid each object box touches.

    The box's pixels x0..x1 of an image W pixels wide cover [x0 * S / W, (x1 + 1) * S / W) of the
    input, S = grid * patch_size (likewise y with the height): a patch touches the box when their
    overlap has positive area, i.e. at the native size when they share at least one pixel
    (corners are inclusive: a box whose x1 is the last pixel of a patch column does not touch
    the next column). Computed in integers (units of 1 / W input pixel), so exact on borders.

    Args:
        boxes: (M, 4) int64 x0, y0, x1, y1 in each image's own pixels, inclusive.
        sizes: (M, 2) int64 (width, height) of each image in its own pixels.
        min_cover: also require the box to cover at least this share of the patch's area
            (0: any overlap; the cluttered CIFAR-10 benchmark counts patches half covered).
    Returns:
        (M, grid * grid) bool, patches in row-major order.
    """
    img_size = grid * patch_size
    edges = torch.arange(grid + 1, dtype=torch.long) * patch_size  # (G + 1,) patch borders at the input

    def overlap(low: torch.Tensor, high: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        start, end = low[:, None] * img_size, (high[:, None] + 1) * img_size  # (M, 1), in 1/size input pixels
        first, last = edges[None, :-1] * size[:, None], edges[None, 1:] * size[:, None]  # (M, G)
        return (torch.minimum(end, last) - torch.maximum(start, first)).clamp_min(0)

    across = overlap(boxes[:, 0], boxes[:, 2], sizes[:, 0])  # (M, G) per patch column
    down = overlap(boxes[:, 1], boxes[:, 3], sizes[:, 1])  # (M, G) per patch row
    area = down[:, :, None] * across[:, None, :]  # (M, G, G) in 1 / (W * H) input pixels
    patch_area = (patch_size**2 * sizes[:, 0] * sizes[:, 1]).double()[:, None, None]
    touches = (area > 0) & (area.double() >= min_cover * patch_area)
    return touches.reshape(len(boxes), grid * grid)


def keep_mask(keep_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, N) bool, True at the (B, K) kept patch indices."""
    return torch.zeros(len(keep_idx), num_patches, dtype=torch.bool).scatter_(1, keep_idx.long(), True)


def coverage_shares(keep: torch.Tensor, on_object: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the share of kept patches on the object and the share of object patches kept.

    Args:
        keep: (B, N) bool, the patches a selection keeps.
        on_object: (B, N) bool, the patches that touch the object (see `box_patches`).
    Returns:
        kept_on_object (B,) and object_kept (B,) as fractions; object_kept is NaN for an image
        none of whose patches is the object's (only possible with `min_cover` > 0).
    """
    kept_on = (keep & on_object).sum(-1).double()
    return kept_on / keep.sum(-1).clamp_min(1), kept_on / on_object.sum(-1)


def coverage_summary(keep: torch.Tensor, on_object: torch.Tensor, without_box: int = 0) -> dict[str, Any]:
    """The two shares of `coverage_shares`, averaged over the images, with the object's share of
    the patches (what a random selection keeps on the object) and the images counted."""
    kept_on_object, object_kept = coverage_shares(keep, on_object)
    return {
        "kept_on_object": float(kept_on_object.mean()),
        "object_kept": float(object_kept.nanmean()),
        "object_share": float(on_object.double().mean()),
        "images": len(keep),
        "images_without_box": without_box,
    }


def selection_coverage(keep_idx: torch.Tensor, boxes: ImageBoxes, grid: int, patch_size: int) -> dict[str, Any]:
    """`coverage_summary` of a selection: `keep_idx` (M, K) the patches kept of the images with a
    box, in the order of `boxes.index`."""
    on_object = box_patches(boxes.boxes, boxes.sizes, grid, patch_size)
    return coverage_summary(keep_mask(keep_idx, grid * grid), on_object, boxes.without_box)
