"""Datasets held in memory as uint8 tensors, batched with their sample indices.

Three sources, chosen by `DataConfig.name`:
  - `digits`: scikit-learn's bundled handwritten digits (8x8, 10 classes), the embedded default;
  - `cifar10`: torchvision's CIFAR-10 in `data_dir` (downloaded only when `download=True`);
  - any other value: the root of an ImageFolder tree with `train/` and `test/` (or `val/`).

Three splits: 'train', 'val' and 'test'. The validation split is `DataConfig.val_fraction` of each
class of the stored training split, held out by a fixed seed (`holdout_positions`), and 'train' is
what is left, so no image serves both; an ImageFolder root with `val/` beside `train/` and `test/`
has its own validation split, and then nothing is held out. Choices (the sweep's knee) read
'val'; 'test' is for reports only. The hold-out is positions in the stored split, taken before
any image of an ImageFolder is decoded, so holding out costs one index per image.

Every split is decoded once into a (N, 3, H, W) uint8 tensor at the model's resolution. That
keeps small-image training (the CPU case LOTUS targets) free of loader workers, and it makes the
dataset index of every sample trivial to carry, by which training looks up each image's data
lottery ticket (its patch keep mask). Augmentation (random crop with zero padding, horizontal flip) runs batched on
those tensors and reports the shift and flip it applied to each image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lotus.config import BUILTIN_DATASETS as BUILTIN_DATASETS  # re-exported: the settings live in lotus.config
from lotus.config import CIFAR10_CLASSES as CIFAR10_CLASSES
from lotus.config import CIFAR10_FOLDER as CIFAR10_FOLDER
from lotus.config import (
    HOLDOUT_SEED,
    DataConfig,
    cifar10_missing,
    class_folders,
    class_words,
    holdout,
    split_dir,
    validation_folder,
)
from lotus.config import class_names as class_names
from lotus.errors import LotusError
from lotus.images import draft, square_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class AugmentConfig:
    padding: int = 0  # random crop: zero-pad each side by this many pixels, crop back to size
    hflip: bool = False  # flip horizontally with probability 0.5


@dataclass
class ImageData:
    """One split of a dataset, decoded."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]  # class names in label order, the identity models are checked by (ImageFolder: the folders)
    name: str  # dataset name as given in DataConfig.name
    split: str  # 'train', 'val' or 'test'
    # (N,) int64: each image's position in the stored split it was taken from (the whole training
    # split, for 'train' and a held-out 'val'); None = the whole stored split, in order
    positions: torch.Tensor | None = None
    class_labels: list[str] | None = None  # the names people see, in label order (classes.tsv); None = classes
    files: list[str] | None = None  # ImageFolder: each image's path relative to the root ('train/cat/001.png')
    sizes: torch.Tensor | None = None  # ImageFolder: (N, 2) int64 (width, height) of each file before resizing

    def __post_init__(self) -> None:
        if self.class_labels is None:
            self.class_labels = list(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def img_size(self) -> int:
        return self.images.shape[-1]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels in [0, 1], for normalisation."""
        x = self.images.float().div_(255).transpose(0, 1).reshape(3, -1)  # (3, N*H*W)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) float, normalised
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64 position of each sample in its split
    shift: torch.Tensor | None  # (B, 2) int64 (dy, dx) pixels the content moved by the crop
    flip: torch.Tensor | None  # (B,) bool, image was flipped left-right


def default_augment(name: str) -> AugmentConfig:
    """Standard training augmentation: CIFAR-style crop + flip; digits are not flip-symmetric,
    and a shift of 1px at 16px (half a digit pixel) is as much as they take."""
    if name == "digits":
        return AugmentConfig(padding=1, hflip=False)
    return AugmentConfig(padding=4, hflip=True)


SPLITS = ("train", "val", "test")
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}  # how reports and records name them


def load_split(cfg: DataConfig, split: str) -> ImageData:
    """Load the 'train', 'val' or 'test' split of the dataset `cfg` names.

    'train' is the stored training split less the images held out for validation; 'val' is those
    images, or an ImageFolder's own val/ (see the module's docstring).

    Raises:
        LotusError: the data is missing, laid out wrongly, or holds an unreadable image; or 'val'
            is asked for and there is none.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    stored, fraction = _stored_split(cfg, split)
    if cfg.name in ("digits", "cifar10"):
        data = _load_digits(stored) if cfg.name == "digits" else _load_cifar10(cfg, stored)
        positions = _taken(data.labels, split, fraction)
        if positions is not None:
            data = ImageData(data.images[positions], data.labels[positions], data.classes, data.name, split, positions)
    else:
        data = _load_image_folder(Path(cfg.name), stored, cfg.img_size, lambda labels: _taken(labels, split, fraction))
    data.split = split
    if cfg.img_size is not None and cfg.img_size != data.img_size:
        data.images = resize_uint8(data.images, cfg.img_size)
    return data


def _stored_split(cfg: DataConfig, split: str) -> tuple[str, float]:
    """The stored split a split is read from ('train', 'val' or 'test') and the share of each class
    held out of it for validation."""
    if split == "test":
        return "test", 0.0
    if split == "val" and validation_folder(cfg) is not None:
        return "val", 0.0
    fraction = holdout(cfg)["fraction"]
    if split == "val" and not fraction:
        raise LotusError("--val-fraction 0 leaves no validation split: pass a --val-fraction above 0 (default 0.05)")
    return "train", fraction


def _taken(labels: torch.Tensor, split: str, fraction: float) -> torch.Tensor | None:
    """Positions of the stored split's images that `split` takes: the held-out ones for 'val', the
    others for 'train'; None for all of them (nothing held out)."""
    if split == "test" or not fraction:
        return None
    held = holdout_positions(labels, fraction)
    if split == "val":
        if not len(held):
            raise LotusError(
                f"--val-fraction {fraction:g} of {len(labels)} training images holds none out: raise it, or pass 0 for none"
            )
        return held
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten()


def holdout_positions(labels: torch.Tensor, fraction: float, seed: int = HOLDOUT_SEED) -> torch.Tensor:
    """Ascending positions of the images held out for validation, stratified by class.

    round(fraction * N) images in all, shared among the classes in proportion to their sizes (the
    largest remainders get the rounding), at most all but one of any class. Within a class, the
    images held out are those first in an order hashed from (seed, position): the same for any
    version of torch or numpy, and cheap (no image is read).

    Args:
        labels: (N,) int64 class of each image of the stored training split.
    """
    classes, counts = labels.unique(return_counts=True)
    quotas = fraction * counts.double()
    take = quotas.floor().long()
    extra = round(fraction * len(labels)) - int(take.sum())
    by_remainder = torch.sort(take.double() - quotas, stable=True).indices  # largest remainder first
    take[by_remainder[:extra]] += 1
    take = torch.minimum(take, counts - 1)
    keys = torch.from_numpy(_hash_order(np.arange(len(labels)), seed).view(np.int64))
    held = []
    for label, count in zip(classes.tolist(), take.tolist()):
        members = (labels == label).nonzero().flatten()
        held.append(members[torch.sort(keys[members], stable=True).indices[:count]])
    return torch.cat(held).sort().values


def _hash_order(positions: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random uint64 key per position (splitmix64 of seed and position)."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def load_split_for_model(cfg: DataConfig, preprocess: dict, split: str) -> ImageData:
    """A split as a trained model expects it: at its input size, with its classes in its order.

    Args:
        preprocess: the checkpoint's preprocessing record (img_size, classes, mean, std).
    """
    data = load_split(replace(cfg, img_size=preprocess["img_size"]), split)
    if data.classes != preprocess["classes"]:
        raise LotusError(
            f"the classes of {cfg.name} ({', '.join(data.classes[:4])}, ...) differ from those the model was trained on "
            f"({', '.join(preprocess['classes'][:4])}, ...): use the dataset the model was trained on"
        )
    return data


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (N, 3, H, W) uint8 batch to (N, 3, size, size), bilinear with antialiasing."""
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Fixed stratified 80/20 split: sklearn ships no test split, and results must be comparable.
    train_idx, test_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target)
    idx = train_idx if split == "train" else test_idx
    gray = torch.from_numpy(digits.images[idx] * (255.0 / 16.0)).round().to(torch.uint8)  # (N, 8, 8)
    images = gray[:, None].expand(-1, 3, -1, -1).contiguous()  # grey to RGB, as every model takes 3 channels
    labels = torch.from_numpy(digits.target[idx]).long()
    return ImageData(images, labels, [str(c) for c in range(10)], "digits", split)


def _load_cifar10(cfg: DataConfig, split: str) -> ImageData:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.data_dir)
    try:
        ds = CIFAR10(str(root), train=split == "train", download=cfg.download)
    except RuntimeError as e:
        if cfg.download:
            raise LotusError(f"could not download CIFAR-10 into {root}: {e}") from None
        raise cifar10_missing(root) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return ImageData(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes), "cifar10", split)


def _load_image_folder(
    root: Path, split: str, img_size: int | None, select: Callable[[torch.Tensor], torch.Tensor | None]
) -> ImageData:
    """One stored split of an ImageFolder root; only the images `select` picks from the labels
    (positions, or None for all) are decoded."""
    folder = split_dir(root, split)
    classes = class_folders(folder)
    # Every other split's classes must be the training classes, in the same label order.
    if split != "train" and classes != class_folders(split_dir(root, "train")):
        raise LotusError(f"class folders of {folder} differ from those of {root / 'train'}: they must match")
    words = class_words(root, classes)  # a malformed classes.tsv is refused before any image is decoded
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _image_files(folder / name)
        if not found:
            raise LotusError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        files += found
        labels += [label] * len(found)
    label_tensor = torch.tensor(labels, dtype=torch.long)
    positions = select(label_tensor)
    if positions is not None:
        files, label_tensor = [files[i] for i in positions.tolist()], label_tensor[positions]
    if img_size is None:
        img_size = _native_size(files[0])
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda f: _decode(f, img_size), files, chunksize=256))
    images = torch.from_numpy(np.stack([array for array, _ in decoded])).permute(0, 3, 1, 2).contiguous()
    relative = [f.relative_to(root).as_posix() for f in files]
    sizes = torch.tensor([size for _, size in decoded], dtype=torch.long)
    return ImageData(images, label_tensor, classes, str(root), split, positions, words, relative, sizes)


def _image_files(folder: Path) -> list[Path]:
    """A class folder's images, sorted; other files (notes, box lists, hidden files such as
    macOS's ._* copies) are not images of the class."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _native_size(path: Path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise LotusError(f"cannot read image {path}: {e}") from None
    if w != h:
        raise LotusError(f"image {path} is {w}x{h}, not square: pass --img-size to resize every image")
    return w


def _decode(path: Path, img_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file as an (img_size, img_size, 3) uint8 array, decoded as the service decodes
    uploads (lotus.images), and its own (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            draft(im, img_size)
            im.load()
            return square_rgb(im, img_size), size
    except Exception as e:
        raise LotusError(f"cannot read image {path}: {e}") from None


def augment_batch(
    images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop with zero padding and random horizontal flip, on a uint8 batch.

    Returns:
        The augmented (B, 3, H, W) batch, the (B, 2) (dy, dx) shift of the content in pixels,
        and the (B,) flip flags (the flip is applied after the shift).
    """
    B, _, H, W = images.shape
    pad = cfg.padding
    shift = torch.zeros(B, 2, dtype=torch.long)
    if pad > 0:
        offset = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator)  # crop corner in the padded image
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = offset[:, :1] + torch.arange(H)  # (B, H)
        cols = offset[:, 1:] + torch.arange(W)  # (B, W)
        batch_idx = torch.arange(B)[:, None, None]
        # (B, H, W, 3) by advanced indexing, back to channels-first
        images = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        shift = pad - offset
    flip = torch.zeros(B, dtype=torch.bool)
    if cfg.hflip:
        flip = torch.rand(B, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images.contiguous(), shift, flip


class BatchLoader:
    """Batches of an in-memory split: shuffled, augmented and normalised, with sample indices.

    The order and the augmentation of epoch `e` depend only on (seed, e), so a run resumed at an
    epoch boundary sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        mean: list[float],
        std: list[float],
        *,
        shuffle: bool = False,
        augment: AugmentConfig | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ):
        self.data = data
        self.batch_size = batch_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.data.images[index]
            shift = flip = None
            if self.augment is not None:
                images, shift, flip = augment_batch(images, self.augment, gen)
            images = (images.float() - self.mean) / self.std
            yield Batch(images, self.data.labels[index], index, shift, flip)

    __iter__ = epoch
