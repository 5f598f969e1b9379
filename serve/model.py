"""The served model: an ONNX Runtime session with the preprocessing its metadata prescribes.

Nothing here knows about HTTP; routes turn its `InputError`s into 4xx answers.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lotus.errors import LotusError
from lotus.runtime import lotus_metadata, ort_session

METADATA_KEYS = ("img_size", "num_patches", "mean", "std", "classes")  # what serving needs from the export


class InputError(ValueError):
    """Bad input from a client: the message says what is wrong; `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as browsers show them


def _to_rgb(image):
    """A decoded PIL image as 8-bit RGB the way a viewer shows it: turned upright by its EXIF
    orientation, transparency composited on ALPHA_BACKGROUND, 16-bit grey scaled to 8 bits."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)  # phones store the sensor's orientation, not the picture's
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: scale to 8 bits (convert would clip)
        grey = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def serving_session(path: Path, threads: int | None, spinning: bool = False) -> object:
    """The server's session: by default no spin-waiting between calls (see lotus.runtime.ort_session)."""
    return ort_session(path, threads, spinning=spinning)


@dataclass
class ServedModel:
    path: Path
    session: object  # onnxruntime.InferenceSession
    img_size: int
    num_patches: int
    classes: list[str]
    mean: np.ndarray  # (3, 1, 1), on the [0, 1] pixel scale
    std: np.ndarray  # (3, 1, 1)
    metadata: dict[str, str]

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
        if inputs != {"pixel_values", "drop"}:
            raise LotusError(
                f"{path} takes inputs {sorted(inputs)}, not pixel_values and drop: serve the drop-by-attention graph (model.onnx)"
            )
        return cls(
            path=path,
            session=session,
            img_size=int(meta["img_size"]),
            num_patches=int(meta["num_patches"]),
            classes=json.loads(meta["classes"]),
            mean=np.array(json.loads(meta["mean"]), dtype=np.float32).reshape(3, 1, 1),
            std=np.array(json.loads(meta["std"]), dtype=np.float32).reshape(3, 1, 1),
            metadata=meta,
        )

    @property
    def input_shape(self) -> list[int]:
        return [-1, 3, self.img_size, self.img_size]

    def run(self, pixel_values: np.ndarray, drop: float) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, classes) logits. Blocking: call it off the event loop."""
        return self.session.run(None, {"pixel_values": pixel_values, "drop": np.array(drop, dtype=np.float32)})[0]

    def decode_image(self, data: bytes, max_pixels: int) -> np.ndarray:
        """A JPEG or PNG file -> (3, H, W) float32, resized and normalised as in training.

        The pixel count is checked from the header before anything is decoded, so an image bomb
        costs nothing; a truncated or corrupt file fails while decoding. Any failure is the
        file's fault, so every one becomes an InputError.
        """
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
        except UnidentifiedImageError:
            raise InputError("the file is not a JPEG or PNG image", 415) from None
        except Image.DecompressionBombError as e:
            raise InputError(f"the image is too large to decode: {e}", 413) from None
        except Exception as e:  # a header PIL recognises but cannot parse
            raise InputError(f"the image cannot be read ({e}): the file is corrupt") from None
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", 413)
            try:
                image.load()  # an animated PNG: its first frame
                rgb = _to_rgb(image)
            except Image.DecompressionBombError as e:
                raise InputError(f"the image is too large to decode: {e}", 413) from None
            except Exception as e:  # truncated or corrupt data
                raise InputError(f"the image cannot be decoded ({e}): the file is truncated or corrupt") from None
        if rgb.size != (self.img_size, self.img_size):  # training's resize: bilinear, to a square
            rgb = rgb.resize((self.img_size, self.img_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W) in [0, 1]
        return (pixels - self.mean) / self.std
