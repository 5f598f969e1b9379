"""Batches made image by image in loader worker processes: for splits streamed from their files,
and for augmentation that works on one image at a time (timm's RandomResizedCrop, RandAugment).

Each worker decodes a file as `lotus.images` decodes it for serving (upright, RGB, a large photo
reduced while it decodes), or takes the image from memory, then augments it:
  - 'none': resized to the model's square input (an evaluation split: cut as timm evaluates where
    its `crop_pct` is set): the pixels the in-memory path holds;
  - 'crop': resized, zero-padded and cropped back, and flipped: the in-memory recipe, per image;
  - 'rrc': timm's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, as
    `timm.data.create_transform` makes them for training;
  - 'randaug': rrc, then timm's RandAugment 'rand-m9-mstd0.5-inc1' (DeiT's recipe).
Digits are never flipped. Every sample reports the geometry it went through (the padded crop's
shift, the resized crop's box as fractions of the image, the flip), so a data lottery ticket can
move with its image (`lotus.tickets.crop_scores`). RandAugment's geometric operations (rotate,
shear, translate) cannot be followed that way: with tickets they are left out (`geometric`).

Workers return uint8 pixels (a quarter of float's bytes through the workers' queues); batches
are normalised in the training process. A sample's randomness is seeded by (seed, epoch, index)
alone, so it does not depend on the number of workers or on which worker drew it, and a run
resumed at an epoch boundary sees exactly the batches an uninterrupted one would.

Unreadable images are skipped and counted, not fatal: each is named in the log and
`StreamLoader.skipped` counts them (training records the count per epoch), so one corrupt JPEG
does not end a multi-hour run and none is dropped silently. A worker that dies (out of memory, a
crashing decoder) ends the epoch with one line saying so, not a hang.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lotus.data import Batch, BatchLoader, ImageData, default_augment
from lotus.errors import LotusError
from lotus.images import draft, square_rgb, upright_rgb
from lotus.progress import log_to_stderr

RANDAUGMENT = "rand-m9-mstd0.5-inc1"
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class Samples(Dataset):
    """The images of a split, decoded and augmented one at a time (see the module's docstring).

    Item i is (uint8 (3, S, S) pixels, label, i, shift, flip, crop), or (None, message) for an
    image that cannot be read. `seed` is set by the loader before each epoch's workers start.
    """

    def __init__(self, data: ImageData, augment: str, geometric: bool = True):
        if augment not in ("none", "crop", "rrc", "randaug"):
            raise ValueError(f"augment must be none, crop, rrc or randaug, not {augment!r}")
        self.data = data
        self.size = data.img_size
        self.augment = augment
        self.seed = 0
        self.labels = data.labels.numpy()
        # Paths as one numpy bytes array: forked workers that read a Python list of strings touch
        # every refcount and so copy the list, once per worker (pytorch/pytorch#13246).
        self.files = None if data.images is not None else np.array([f.encode() for f in data.files])
        self.crop_pct = data.crop_pct if self.files is not None else None  # images in memory were cut as decoded
        self.hflip = data.name != "digits"  # a flipped digit is another symbol, or none
        self.padding = default_augment(data.name).padding
        if augment in ("rrc", "randaug"):
            from timm.data import create_transform

            primary, self.photometric, _ = create_transform(
                self.size,
                is_training=True,
                separate=True,
                hflip=0.0,  # flipped here, so the flip can be reported
                color_jitter=None,
                auto_augment=RANDAUGMENT if augment == "randaug" else None,
                re_prob=0.0,
            )
            self.rrc = primary.transforms[0]
            if not geometric:
                for t in self.photometric.transforms:
                    if hasattr(t, "ops"):
                        t.ops = [op for op in t.ops if op.name not in GEOMETRIC_OPS]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        with _seeded(hash((self.seed, i)) % 2**32):
            try:
                image = self._image(i)
            except Exception as e:  # a decoder's error of any type: the file, not the run, is bad
                path = self.files[i].decode() if self.files is not None else str(i)
                return None, f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            return self._augmented(image, i)

    def _image(self, i: int):
        """Sample i as an upright RGB PIL image: decoded from its file, or from memory."""
        from PIL import Image

        if self.files is None:
            return Image.fromarray(self.data.images[i].permute(1, 2, 0).numpy())
        with Image.open(self.data.root / self.files[i].decode()) as im:
            draft(im, self.size)
            im.load()
            return upright_rgb(im, self.size)

    def _augmented(self, image, i: int):
        from PIL import Image

        shift = flip = crop = None
        if self.augment in ("rrc", "randaug"):
            import torchvision.transforms.functional as TF

            width, height = image.size
            top, left, h, w = self.rrc.get_params(image, self.rrc.scale, self.rrc.ratio)
            interpolation = self.rrc.interpolation
            if isinstance(interpolation, (tuple, list)):
                interpolation = random.choice(interpolation)
            image = TF.resized_crop(image, top, left, h, w, list(self.rrc.size), interpolation)
            crop = torch.tensor([top / height, left / width, h / height, w / width])
            flip = self.hflip and random.random() < 0.5
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = self.photometric(image)
            pixels = np.array(image, dtype=np.uint8)  # a writable copy: torch takes it as is
        else:
            pixels = square_rgb(image, self.size, self.crop_pct)
            if self.augment == "crop":
                pixels, shift, flip = self._padded_crop(pixels)
        pixels = pixels if pixels.flags.writeable and pixels.flags.c_contiguous else np.array(pixels)
        return torch.from_numpy(pixels).permute(2, 0, 1), int(self.labels[i]), i, shift, flip, crop

    def _padded_crop(self, pixels: np.ndarray):
        """Zero-pad each side by `padding`, crop back at a random corner, flip: as `augment_batch`."""
        pad, S = self.padding, self.size
        padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)))
        oy, ox = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
        pixels = padded[oy : oy + S, ox : ox + S]
        flip = self.hflip and random.random() < 0.5
        if flip:
            pixels = pixels[:, ::-1]
        return pixels, torch.tensor([pad - oy, pad - ox]), flip


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed Python's, numpy's and torch's global generators (timm's transforms draw from them);
    in the training process itself (no workers) their states are put back afterwards."""
    from torch.utils.data import get_worker_info

    inside = get_worker_info() is None
    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if inside else None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])


def _collate(samples: list) -> tuple:
    """Stack the samples that were read; the messages of those that were not."""
    failed = [s[1] for s in samples if s[0] is None]
    good = [s for s in samples if s[0] is not None]
    if not good:
        return None, failed
    pixels, labels, index, shift, flip, crop = zip(*good)
    return (
        torch.stack(pixels),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(index, dtype=torch.long),
        None if shift[0] is None else torch.stack(shift),
        None if flip[0] is None else torch.tensor(flip, dtype=torch.bool),
        None if crop[0] is None else torch.stack(crop),
    ), failed


class StreamLoader(BatchLoader):
    """Batches of a split made by loader workers image by image: the same batches for any
    number of workers (see the module's docstring), in the order `BatchLoader` would cut them."""

    def __init__(
        self,
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
        log: Callable[[str], None] = log_to_stderr,
    ):
        super().__init__(data, batch_size, mean, std, shuffle=shuffle, drop_last=drop_last, seed=seed)
        self.samples = Samples(data, augment, geometric)
        self.workers = default_workers() if workers is None else workers
        self.pin_memory = pin_memory
        self.log = log
        self.skipped = 0  # unreadable images met so far

    def epoch(self, epoch: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """The batches of `epoch`; with `world` > 1 process `rank`'s share of each (every
        `world`-th sample), and only that share is read."""
        order, _ = self._order(epoch)
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size][rank::world].tolist() for i in range(len(self))]
        self.samples.seed = self.seed * 100_003 + epoch
        loader = DataLoader(
            self.samples,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(self.samples.seed),  # not the training process's generator
        )
        try:
            for stacked, failed in loader:
                for message in failed:
                    self.skipped += 1
                    self.log(f"skipped an unreadable image ({self.skipped} so far): {message}")
                if stacked is None:
                    continue
                pixels, labels, index, shift, flip, crop = stacked
                images = (pixels.float() - self.mean) / self.std
                if self.pin_memory:
                    images = images.pin_memory()
                yield Batch(images, labels, index, shift, flip, crop)
        except (RuntimeError, ConnectionError, EOFError) as e:
            # a worker that dies while the batch it sent is still being received closes or resets
            # that connection (EOFError, ConnectionError) before torch notices the death (RuntimeError)
            if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
                raise
            said = (str(e).strip().splitlines() or [type(e).__name__])[0]  # an EOFError says nothing
            raise LotusError(
                f"a data loader worker stopped ({said}): if memory ran out, lower --workers "
                "or --batch-size; `--resume` continues from the last finished epoch"
            ) from None

    __iter__ = epoch
