"""Datasets as labelled images with their sample indices: decoded into memory, or streamed from files.

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

Two ways to hold a split (`DataConfig.loader`). In memory: decoded once into a (N, 3, H, W) uint8
tensor at the model's resolution, which keeps small-image training (the CPU case) free of loader
workers; batches are cut, augmented (random crop with zero padding, horizontal flip) and
normalised on that tensor by `BatchLoader`. Streamed (an ImageFolder whose decoded split would
not fit `MEMORY_BUDGET` of the machine's memory, or `--loader stream`): only the file list is
held, and `lotus.stream.StreamLoader` decodes and augments each image in loader worker processes,
so memory does not grow with the dataset. Either way every batch carries each sample's index in
its split, by which training looks up its data lottery ticket (its patch keep mask), and the
geometry its augmentation applied, by which the ticket moves with the image.
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
    MEMORY_BUDGET,
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
from lotus.images import centre_crop_box, draft, square_rgb, upright_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class AugmentConfig:
    padding: int = 0  # random crop: zero-pad each side by this many pixels, crop back to size
    hflip: bool = False  # flip horizontally with probability 0.5


@dataclass
class ImageData:
    """One split of a dataset: decoded (`images`), or its files, read as they are needed (`images` None)."""

    images: torch.Tensor | None  # (N, 3, H, W) uint8; None: streamed from `files` (see lotus.stream)
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
    size: int | None = None  # side of the square images, needed when streamed (else the tensor's)
    crop_pct: float | None = None  # evaluation's centre crop the images were (or are, streamed) cut with; None: whole

    def __post_init__(self) -> None:
        if self.class_labels is None:
            self.class_labels = list(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def img_size(self) -> int:
        return self.images.shape[-1] if self.images is not None else self.size

    @property
    def streamed(self) -> bool:
        return self.images is None

    @property
    def root(self) -> Path:
        return Path(self.name)

    def paths(self, index: list[int]) -> list[Path]:
        """The files of the images at `index`."""
        return [self.root / self.files[i] for i in index]

    def subset(self, index: torch.Tensor) -> ImageData:
        """The images at `index` as a split of their own, held as this one is (in memory, or streamed)."""
        if not self.streamed:
            return self.take(index)
        files = [self.files[i] for i in index.tolist()]
        return ImageData(
            None,
            self.labels[index],
            self.classes,
            self.name,
            self.split,
            None,
            self.class_labels,
            files,
            size=self.size,
            crop_pct=self.crop_pct,
        )

    def take(self, index: torch.Tensor) -> ImageData:
        """The images at `index` as a split of their own, in memory (decoded now when streamed):
        for the small subsets that weak copies, calibration and figures use."""
        if not self.streamed:
            images, sizes = self.images[index], None if self.sizes is None else self.sizes[index]
        else:
            images, sizes = _decode_files(self.paths(index.tolist()), self.img_size, self.crop_pct)
        files = None if self.files is None else [self.files[i] for i in index.tolist()]
        labels = self.labels[index]
        return ImageData(
            images, labels, self.classes, self.name, self.split, None, self.class_labels, files, sizes, crop_pct=self.crop_pct
        )

    def image_sizes(self) -> torch.Tensor:
        """(N, 2) (width, height) of every file; streamed splits read them from the file headers."""
        if self.sizes is None and self.files is not None:
            self.sizes = torch.tensor([_header_size(p) for p in self.paths(range(len(self)))], dtype=torch.long)
        return self.sizes

    def channel_stats(self, max_images: int = 2_000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pixels in [0, 1], for normalisation: over every image
        held in memory, or over `max_images` spread through a streamed split; a chunk at a time,
        so no float copy of the split (nor a decoded copy of a streamed one) is made."""
        index = torch.arange(len(self))
        if self.streamed:
            index = torch.linspace(0, len(self) - 1, min(max_images, len(self))).long().unique()
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        per_chunk = max(1, (1 << 22) // (3 * self.img_size**2))  # about 16 MB of float32 at a time
        for chunk in index.split(per_chunk):
            images = self.take(chunk).images if self.streamed else self.images[chunk[0] : chunk[-1] + 1]
            x = images.transpose(0, 1).reshape(3, -1).float()
            total += x.sum(1, dtype=torch.float64)
            squares += x.square().sum(1, dtype=torch.float64)
        n = len(index) * self.img_size**2
        mean = total / n
        std = ((squares - n * mean.square()) / max(1, n - 1)).clamp_min(0).sqrt()
        return (mean / 255).tolist(), (std / 255).clamp_min(1e-3).tolist()


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) float, normalised
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64 position of each sample in its split
    shift: torch.Tensor | None  # (B, 2) int64 (dy, dx) pixels the content moved by a padded crop
    flip: torch.Tensor | None  # (B,) bool, image was flipped left-right (after the crop)
    # (B, 4) float (top, left, height, width) of a resized crop, as fractions of the whole image
    crop: torch.Tensor | None = None


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
    images, or an ImageFolder's own val/ (see the module's docstring). 'val' and 'test' are cut
    with `cfg.crop_pct` where it is set; 'train' never is.

    Raises:
        LotusError: the data is missing, laid out wrongly, or holds an unreadable image; or 'val'
            is asked for and there is none.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    stored, fraction = _stored_split(cfg, split)
    crop = cfg.crop_pct if split != "train" else None
    if cfg.name in ("digits", "cifar10"):
        data = _load_digits(stored) if cfg.name == "digits" else _load_cifar10(cfg, stored)
        positions = _taken(data.labels, split, fraction)
        if positions is not None:
            data = ImageData(data.images[positions], data.labels[positions], data.classes, data.name, split, positions)
        if crop is not None:
            data.images = centre_crop_uint8(data.images, cfg.img_size or data.img_size, crop)
    else:
        data = _load_image_folder(cfg, stored, cfg.img_size, lambda labels: _taken(labels, split, fraction), crop)
    data.split, data.crop_pct = split, crop
    if cfg.img_size is not None and cfg.img_size != data.img_size and not data.streamed:
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
        preprocess: the checkpoint's preprocessing record (img_size, crop_pct, classes, mean, std).
    """
    data = load_split(replace(cfg, img_size=preprocess["img_size"], crop_pct=preprocess.get("crop_pct")), split)
    if data.classes != preprocess["classes"]:
        raise LotusError(
            f"the classes of {cfg.name} ({', '.join(data.classes[:4])}, ...) differ from those the model was trained on "
            f"({', '.join(preprocess['classes'][:4])}, ...): use the dataset the model was trained on"
        )
    return data


def resize_uint8(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a (N, 3, H, W) uint8 batch to (N, 3, size, size) (or size's (height, width)),
    bilinear with antialiasing."""
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=size if isinstance(size, tuple) else (size, size), mode="bilinear", antialias=True)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def centre_crop_uint8(images: torch.Tensor, size: int, crop_pct: float) -> torch.Tensor:
    """A (N, 3, H, W) uint8 batch as timm evaluates it (`lotus.images.centre_crop_box`): (N, 3, size, size)."""
    (width, height), (left, top, right, bottom) = centre_crop_box(images.shape[-1], images.shape[-2], size, crop_pct)
    return resize_uint8(images, (height, width))[..., top:bottom, left:right].contiguous()


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
    cfg: DataConfig,
    split: str,
    img_size: int | None,
    select: Callable[[torch.Tensor], torch.Tensor | None],
    crop_pct: float | None = None,
) -> ImageData:
    """One stored split of an ImageFolder root; only the images `select` picks from the labels
    (positions, or None for all) are decoded (cut with `crop_pct` where set), and only when the
    split is held in memory."""
    root = Path(cfg.name)
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
    relative = [f.relative_to(root).as_posix() for f in files]
    if stream_split(cfg, len(files), img_size):
        return ImageData(None, label_tensor, classes, str(root), split, positions, words, relative, size=img_size)
    images, sizes = _decode_files(files, img_size, crop_pct)
    return ImageData(images, label_tensor, classes, str(root), split, positions, words, relative, sizes)


def decoded_bytes(num_images: int, img_size: int) -> int:
    return num_images * 3 * img_size * img_size


def memory_budget() -> int:
    """Bytes a decoded split may take in memory: MEMORY_BUDGET of the machine's physical memory."""
    return int(MEMORY_BUDGET * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def stream_split(cfg: DataConfig, num_images: int, img_size: int) -> bool:
    """Whether a split of `num_images` at `img_size` is streamed from its files (see the module's docstring)."""
    if cfg.loader != "auto":
        return cfg.loader == "stream"
    return decoded_bytes(num_images, img_size) > memory_budget()


def _decode_files(files: list[Path], img_size: int, crop_pct: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode image files into one preallocated (N, 3, S, S) uint8 tensor (the only copy of the
    pixels) and their (N, 2) (width, height)."""
    images = np.empty((len(files), 3, img_size, img_size), dtype=np.uint8)
    sizes = np.empty((len(files), 2), dtype=np.int64)

    def decode_into(i: int) -> None:
        array, size = _decode(files[i], img_size, crop_pct)
        images[i] = array.transpose(2, 0, 1)
        sizes[i] = size

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(decode_into, range(len(files)), chunksize=256):
            pass
    return torch.from_numpy(images), torch.from_numpy(sizes)


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


def _header_size(path: Path) -> tuple[int, int]:
    """An image file's (width, height) upright, from its header (as `_decode` reports it), nothing decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return upright_size(im)
    except Exception as e:
        raise LotusError(f"cannot read image {path}: {e}") from None


def _decode(path: Path, img_size: int, crop_pct: float | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file as an (img_size, img_size, 3) uint8 array, decoded as the service decodes
    uploads (lotus.images), and its own (width, height), upright as its pixels are."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = upright_size(im)
            draft(im, img_size)
            im.load()
            return square_rgb(im, img_size, crop_pct), size
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

    workers = 0  # batches are cut in this process
    skipped = 0  # decoded up front: an unreadable image stops the load, none is skipped

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """Epoch `epoch`'s sample order, and the generator that drew it (augmentation draws on)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self.data)
        return (torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)), gen

    def epoch(self, epoch: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """The batches of `epoch`; with `world` > 1 process `rank`'s share of each (every
        `world`-th sample), cut from the same batch every process draws."""
        order, gen = self._order(epoch)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.data.images[index]
            shift = flip = None
            if self.augment is not None:
                images, shift, flip = augment_batch(images, self.augment, gen)
            images = (images.float() - self.mean) / self.std
            batch = Batch(images, self.data.labels[index], index, shift, flip)
            yield batch if world == 1 else Batch(*(None if t is None else t[rank::world] for t in batch))

    __iter__ = epoch


Loader = BatchLoader  # or its subclass lotus.stream.StreamLoader: both yield Batch from epoch(epoch, rank, world)


def make_loader(
    data: ImageData,
    batch_size: int,
    mean: list[float],
    std: list[float],
    *,
    augment: str = "none",
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    workers: int | None = None,
    geometric: bool = True,
    pin_memory: bool = False,
) -> Loader:
    """Batches of `data` the cheapest way they can be made: cut from memory (`BatchLoader`) for
    a split held in memory with no augmentation or the padded crop; else from loader workers
    that decode and augment image by image (`lotus.stream.StreamLoader`).

    Args:
        augment: 'none', 'crop', 'rrc' or 'randaug' (see `resolve_augment`).
        geometric: False leaves RandAugment's geometric operations out (rotate, shear,
            translate): the kept patches of data lottery tickets follow crops and flips only.
    """
    if not data.streamed and augment in ("none", "crop"):
        crop = default_augment(data.name) if augment == "crop" else None
        return BatchLoader(data, batch_size, mean, std, shuffle=shuffle, augment=crop, drop_last=drop_last, seed=seed)
    from lotus.stream import StreamLoader

    return StreamLoader(
        data,
        batch_size,
        mean,
        std,
        augment=augment,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        workers=workers,
        geometric=geometric,
        pin_memory=pin_memory,
    )


def resolve_augment(augment: str, data: ImageData) -> str:
    """`--aug auto` as the data holds it: the padded crop for a split in memory (cheap, batched),
    timm's RandomResizedCrop for a streamed one (as timm trains on ImageNet)."""
    if augment != "auto":
        return augment
    return "rrc" if data.streamed else "crop"
