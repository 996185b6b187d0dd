"""Any decoded image -> upright 8-bit RGB: training files (model.data) and served URLs (worker.decode) alike.

Pillow and numpy only, no torch: `imgq report` makes thumbnails with it (through worker.decode) without
loading torch.
"""

from __future__ import annotations

import contextlib

import numpy as np
from PIL import Image, ImageOps


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image -> upright 8-bit RGB, the same for training files and served URLs: EXIF
    orientation applied, transparency composited on white, CMYK converted, 16-bit and float greyscale
    scaled (not clipped) to 8 bits."""
    return _convert(_upright(img))


_WHITE = (255, 255, 255)


def _upright(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation, so a rotated phone photo gets the same label as an upright one."""
    # Unreadable EXIF is ignored: the pixels are fine, keep them as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an image that needs no turning
    return im


def _convert(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        return _on_white(im.convert("RGBA"))
    return im.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scale_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float greyscale to 8 bits by scaling; Pillow's convert would clip at 255."""
    values = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and values.min() >= 0 and values.max() <= 0xFFFF):
        scaled = values.astype(np.float32) / 257.0  # the full 16-bit range onto 0..255
    else:
        floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(floats.min()), float(floats.max())
        if im.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = floats * 255.0  # the usual 0..1 float convention
        else:
            scaled = (floats - low) * (255.0 / (high - low)) if high > low else np.zeros_like(floats)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
