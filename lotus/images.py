"""Image files as a model sees them, the same in training (lotus.data) and in serving (serve.model).

An image is taken as a viewer shows it: turned upright by its EXIF orientation, transparency
composited on ALPHA_BACKGROUND, 16-bit samples scaled to 8 bits, an animated PNG's first frame.
Then it is resized to a square of the model's input size, bilinear: the whole image, or, for
evaluation with a crop_pct, as timm evaluates (the shorter side to size / crop_pct, the centre cut
out). A photo much larger than that is first reduced cheaply: a JPEG decodes at one of libjpeg's
1/8 ... 1/1 scales (draft mode), and other images are box-averaged a strip of rows at a time, so
the only full-size buffer is the decoded image itself; the pixels differ from a direct resize by
about one level in 255 on average.
Without torch: the service imports it.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as browsers show them
STRIP_PIXELS = 1 << 18  # rows are converted and reduced about a quarter megapixel at a time
REDUCING_GAP = 3  # a large image is reduced to >= 3x the input size before the resize (as Pillow's thumbnail)


def draft(image, size: int) -> None:
    """Let a JPEG decode at the smallest scale that stays REDUCING_GAP times `size` (changes
    `image.size`, decodes nothing); other formats are left alone."""
    if image.format == "JPEG":
        image.draft("RGB", (REDUCING_GAP * size,) * 2)


def square_rgb(image, size: int, crop_pct: float | None = None) -> np.ndarray:
    """A loaded PIL image -> (size, size, 3) uint8, as a viewer shows it, resized bilinear: the
    whole image to the square, or with `crop_pct` as timm evaluates (`centre_crop_box`)."""
    from PIL import Image

    rgb = upright_rgb(image, size)
    if crop_pct is not None:
        scaled, box = centre_crop_box(*rgb.size, size, crop_pct)
        return np.asarray(rgb.resize(scaled, Image.Resampling.BILINEAR).crop(box), dtype=np.uint8)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def centre_crop_box(width: int, height: int, size: int, crop_pct: float) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """timm's evaluation transform for an image of width x height: resized so its shorter side is
    floor(size / crop_pct), aspect kept, then the centre size x size cut out (torchvision's Resize
    and CenterCrop). Returns the resized (width, height) and the cut's (left, top, right, bottom)."""
    short = math.floor(size / crop_pct)
    scaled = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    left, top = round((scaled[0] - size) / 2), round((scaled[1] - size) / 2)
    return scaled, (left, top, left + size, top + size)


def resize_words(size: int, crop_pct: float | None) -> str:
    """How images are resized to the model's input, in words (the checkpoint's and export's `resize`)."""
    if crop_pct is None:
        return "bilinear, to img_size x img_size"  # as checkpoints have always said it
    return f"bilinear, shorter side to {math.floor(size / crop_pct)}, centre {size} x {size} cut out (crop_pct {crop_pct:g})"


def to_rgb(image):
    """A decoded PIL image as 8-bit RGB: transparency composited on ALPHA_BACKGROUND, 16-bit
    grey scaled to 8 bits (convert would clip it)."""
    from PIL import Image

    if image.mode.startswith("I"):
        grey = (np.asarray(image).astype(np.uint32) + 128) // 257  # round(v / 257): 65535 -> 255
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright_size(image) -> tuple[int, int]:
    """An opened PIL image's (width, height) as a viewer shows it: EXIF orientations 5 to 8 turn
    it a quarter, so the stored width is the shown height (read from the header, nothing decoded)."""
    from PIL import ExifTags

    width, height = image.size
    turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def upright_rgb(image, size: int):
    """A loaded PIL image as 8-bit RGB at least REDUCING_GAP * `size` on each side (where it was
    larger), turned upright by its EXIF orientation.

    Large images are converted and box-averaged strip by strip: compositing before averaging gives
    the same pixels as averaging first, and no full-size RGBA, float or 8-bit copy is ever made.
    """
    from PIL import Image, ImageOps

    width, height = image.size
    factor = max(1, min(width, height) // (REDUCING_GAP * size))  # one factor: the same blur both ways
    if factor == 1:
        small = to_rgb(image)
    else:
        small = Image.new("RGB", (-(-width // factor), -(-height // factor)))
        rows = max(1, STRIP_PIXELS // (width * factor)) * factor
        for top in range(0, height, rows):
            strip = image.crop((0, top, width, min(top + rows, height)))
            small.paste(to_rgb(strip).reduce(factor), (0, top // factor))
    small.info = dict(image.info)  # the EXIF and XMP orientation travel with it
    return ImageOps.exif_transpose(small)  # phones store the sensor's orientation, not the picture's
