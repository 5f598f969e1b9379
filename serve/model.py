"""The served model: an ONNX Runtime session with the preprocessing its metadata prescribes.

Nothing here knows about HTTP; the app turns its `InputError`s into 4xx answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lotus.drop import MAX_DROP, num_keep
from lotus.errors import LotusError
from lotus.images import STRIP_PIXELS, draft, square_rgb
from lotus.runtime import lotus_metadata, ort_session
from serve.errors import InputError

METADATA_KEYS = ("img_size", "num_patches", "mean", "std", "classes")  # what serving needs from the export


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc): a decoded photo's buffers would
    otherwise stay in the process's RSS. No-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def serving_session(path: Path, threads: int | None, spinning: bool = False) -> object:
    """The server's session: by default no spin-waiting between calls (see lotus.runtime.ort_session)."""
    return ort_session(path, threads, spinning=spinning)


@dataclass
class ServedModel:
    path: Path
    session: object  # onnxruntime.InferenceSession
    img_size: int
    num_patches: int
    classes: list[str]  # the class names in logit order, as trained (ImageFolder: the folder names)
    labels: list[str]  # what /v1/classify answers for each logit: the metadata's labels, else the classes
    mean: np.ndarray  # (3, 1, 1), on the [0, 1] pixel scale
    std: np.ndarray  # (3, 1, 1)
    metadata: dict[str, str]
    merge_per_block: int = 0  # a token-merging graph (`lotus export onnx --merge R`): its r; it takes no drop
    crop_pct: float | None = None  # images cut as timm evaluates (lotus.images.square_rgb); None: resized whole

    @staticmethod
    def check(path: str | Path) -> dict[str, str]:
        """The metadata of an exported LOTUS model, or a LotusError saying what is missing."""
        return lotus_metadata(path, METADATA_KEYS)

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, spinning: bool = False) -> ServedModel:
        path = Path(path)
        meta = cls.check(path)
        session = serving_session(path, threads, spinning)
        inputs = {i.name for i in session.get_inputs()}
        merge = int(meta.get("merge_per_block", 0))
        if inputs != ({"pixel_values"} if merge else {"pixel_values", "drop"}):
            raise LotusError(
                f"{path} takes inputs {sorted(inputs)}, not pixel_values and drop: serve the drop-by-attention graph (model.onnx)"
                " or a token-merging one (`lotus export onnx --merge R`)"
            )
        classes = json.loads(meta["classes"])
        return cls(
            path=path,
            session=session,
            img_size=int(meta["img_size"]),
            num_patches=int(meta["num_patches"]),
            classes=classes,
            labels=_labels(path, meta, classes),
            mean=np.array(json.loads(meta["mean"]), dtype=np.float32).reshape(3, 1, 1),
            std=np.array(json.loads(meta["std"]), dtype=np.float32).reshape(3, 1, 1),
            metadata=meta,
            merge_per_block=merge,
            crop_pct=json.loads(meta.get("crop_pct", "null")),  # exported before crops: whole images
        )

    @property
    def input_shape(self) -> list[int]:
        return [-1, 3, self.img_size, self.img_size]

    def patches_kept(self, drop: float) -> int:
        """The patches each image keeps at a request's `drop`; an InputError for a merging graph's
        drop above 0 (it merges tokens instead, at the r it was exported with)."""
        if self.merge_per_block and drop > 0:
            raise InputError(
                f"this model merges tokens (ToMe, r {self.merge_per_block} per block) and does not drop patches: "
                "send drop 0 or leave it out"
            )
        return num_keep(self.num_patches, drop)

    @property
    def drop_parameter(self) -> str:
        """What the model metadata says of the request parameter `drop`."""
        if self.merge_per_block:
            return f"0 only: the model merges tokens (ToMe, r {self.merge_per_block} per block) instead of dropping patches"
        return f"request parameter, fraction of patches to skip in [0, {MAX_DROP}], default 0"

    def run(self, pixel_values: np.ndarray, drop: float) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, classes) logits. Blocking: call it off the event loop."""
        feed = {"pixel_values": pixel_values}
        if not self.merge_per_block:
            feed["drop"] = np.array(drop, dtype=np.float32)
        return self.session.run(None, feed)[0]

    def decode_image(self, data: bytes, max_pixels: int) -> np.ndarray:
        """A JPEG or PNG file -> (3, H, W) float32, resized (and cut) and normalised as in evaluation.

        It is decoded exactly as training decodes its files (lotus.images). The pixel count it
        would decode to is checked from the header before anything is decoded, so an image bomb
        costs nothing. A truncated or corrupt file fails while decoding. Any failure is the file's
        fault, so every one is an InputError.
        """
        from PIL import Image

        image = _open_image(data)
        with image:
            draft(image, self.img_size)  # a JPEG: decoded at a reduced scale
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    f"the image decodes to {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                    "(--max-pixels): send a smaller image",
                    413,
                )
            try:
                image.load()  # an animated PNG: its first frame
                rgb = square_rgb(image, self.img_size, self.crop_pct)
            except Image.DecompressionBombError as e:
                raise InputError(f"the image is too large to decode: {e}", 413) from None
            except Exception as e:  # truncated or corrupt data
                raise InputError(f"the image cannot be decoded ({e}): the file is truncated or corrupt") from None
        if width * height > STRIP_PIXELS:
            release_memory()
        pixels = rgb.astype(np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W) in [0, 1]
        return (pixels - self.mean) / self.std


def _labels(path: Path, meta: dict[str, str], classes: list[str]) -> list[str]:
    """The metadata's `labels` (one per class), or the class names where an export has none."""
    if "labels" not in meta:  # exported before labels were recorded
        return classes
    labels = json.loads(meta["labels"])
    if len(labels) != len(classes):
        raise LotusError(f"{path} has {len(labels)} labels for {len(classes)} classes: export it again with `lotus export onnx`")
    return labels


def _open_image(data: bytes):
    """The PIL image of a JPEG or PNG file, header read, nothing decoded; InputError otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
    except UnidentifiedImageError:
        raise InputError("the file is not a JPEG or PNG image", 415) from None
    except Image.DecompressionBombError as e:
        raise InputError(f"the image is too large to decode: {e}", 413) from None
    except Exception as e:  # a header PIL recognises but cannot parse
        raise InputError(f"the image cannot be read ({e}): the file is corrupt") from None
