"""Turn untrusted bytes into one loaded RGB image, or an ItemError that says why not.

* The format comes from magic bytes (:func:`sniff_format`), never from Content-Type, and Pillow is only allowed
  that one decoder (``Image.open(..., formats=[fmt])``). Not an allowed format -> ``not_an_image``.
* The declared size is checked against ``max_pixels`` right after ``open`` (which reads headers only) and
  before ``load`` allocates pixels -> ``too_large``. Pillow's own bomb guard maps there too.
* Truncated or corrupt data -> ``decode_error``. ``LOAD_TRUNCATED_IMAGES`` stays off: a half-grey photo would
  get a confident wrong label.
* The exception classes Pillow's fuzzers treat as expected for hostile input are mapped; anything else is a
  bug and propagates (the worker reports it as ``internal``).

The result is always ``mode == "RGB"`` and loaded: EXIF orientation applied, first frame of an animation,
transparency composited on white, CMYK converted, 16-bit and float images scaled (not clipped) to 8 bits.

Thread-safe: the worker decodes in a thread pool, so nothing here touches Pillow's or ``warnings``' globals.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from imgq.errors import ErrorCode, ItemError

# Magic bytes per format: (offset, prefix).
_MAGIC: tuple[tuple[str, int, bytes], ...] = (
    ("JPEG", 0, b"\xff\xd8\xff"),
    ("PNG", 0, b"\x89PNG\r\n\x1a\n"),
    ("GIF", 0, b"GIF87a"),
    ("GIF", 0, b"GIF89a"),
    ("WEBP", 8, b"WEBP"),  # after b"RIFF" + 4-byte length, checked below
    ("BMP", 0, b"BM"),
    ("TIFF", 0, b"II*\x00"),
    ("TIFF", 0, b"MM\x00*"),
    ("TIFF", 0, b"II+\x00"),  # BigTIFF
    ("TIFF", 0, b"MM\x00+"),
)

# What Pillow raises for hostile input (its OSS-Fuzz harness lets these through as "expected").
# Warnings are listed because a process running with warnings-as-errors turns Pillow's into exceptions.
_EXPECTED = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    TypeError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    Warning,
)

_WHITE = (255, 255, 255)


def sniff_format(data: bytes) -> str | None:
    """The image format named by ``data``'s magic bytes ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"), or None."""
    for name, offset, magic in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (name != "WEBP" or data[:4] == b"RIFF"):
            return name
    return None


def _describe(data: bytes) -> str:
    head = data[:16]
    if not head:
        return "the body is empty"
    if head.lstrip().startswith((b"<", b"{", b"[")):
        return f"it looks like text/markup ({head!r}...)"
    return f"it starts with {head!r}"


def decode_image(
    data: bytes, *, max_pixels: int, formats: Sequence[str], draft_size: int | None = None
) -> Image.Image:
    """A loaded RGB image decoded from ``data``, or ItemError (not_an_image, too_large, decode_error).

    ``draft_size``: for JPEG, let libjpeg scale by 1/2, 1/4 or 1/8 while decoding, as long as the short side
    stays at least ``draft_size`` (much faster than decoding a 24 MP photo in full and resizing).
    """
    fmt = sniff_format(data)
    if fmt is None or fmt not in formats:
        what = "an unknown format" if fmt is None else f"{fmt}, which is not enabled"
        raise ItemError(
            ErrorCode.NOT_AN_IMAGE,
            f"not an image in an allowed format ({', '.join(formats)}): {what}; {_describe(data)}",
        )
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
        _check_size(im, fmt, max_pixels)
        if draft_size is not None and fmt == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        return _to_rgb(_upright(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(
            ErrorCode.TOO_LARGE, f"{fmt} image is far larger than allowed (IMGQ_MAX_PIXELS={max_pixels}): {exc}"
        ) from None
    except MemoryError:
        raise ItemError(ErrorCode.TOO_LARGE, f"{fmt} image needs more memory than is available") from None
    except _EXPECTED as exc:
        raise ItemError(ErrorCode.DECODE_ERROR, f"corrupt or truncated {fmt}: {type(exc).__name__}: {exc}") from None


def _check_size(im: Image.Image, fmt: str, max_pixels: int) -> None:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ItemError(ErrorCode.DECODE_ERROR, f"{fmt} declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ItemError(
            ErrorCode.TOO_LARGE,
            f"{fmt} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (IMGQ_MAX_PIXELS)",
        )


def _upright(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation, so a rotated phone photo gets the same label as an upright one."""
    # Unreadable EXIF is ignored: the pixels are fine, keep them as stored.
    with contextlib.suppress(*_EXPECTED):
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an image that needs no turning
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
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
