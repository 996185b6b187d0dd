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

import io
import struct
from collections.abc import Sequence

from PIL import Image

from imgq.errors import ErrorCode, ItemError
from model.preprocess import to_rgb

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
        # The data is all in memory: hand the decoder all of it in one call (one GIL release per image
        # instead of one per 64 KB block, which other worker threads were left waiting on).
        im.decodermaxblock = max(im.decodermaxblock, len(data))
        im.load()
        return to_rgb(im)
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
