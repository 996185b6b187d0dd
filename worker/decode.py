"""Turn untrusted bytes into one loaded RGB image, or an ItemError that says why not.

* The format comes from magic bytes (:func:`sniff_format`), never from Content-Type, and Pillow is only allowed
  that one decoder (``Image.open(..., formats=[fmt])``). Not an allowed format -> ``not_an_image``.
* The declared size is checked against ``max_pixels`` right after ``open`` (which reads headers only) and
  before ``load`` allocates pixels -> ``too_large``. Pillow's own bomb guard maps there too.
* CPU, the other thing a small file can demand, is checked before ``open`` (:func:`check_complexity`) ->
  ``too_complex``: a JPEG with more scans than ``max_jpeg_scans`` (each scan is a pass over every block: a
  100 KB progressive JPEG of 5000 scans costs 15 s), and JPEG headers or PNGs made of thousands of empty
  segments or chunks (Pillow parses those in Python: 8-15 s for 20 MB). What is left is linear in the bytes
  at C speed, which ``IMGQ_MAX_BYTES`` caps, and the engine's decode deadline (``IMGQ_DECODE_TIMEOUT``) bounds
  whatever a check here misses. Nothing here iterates frames (``n_frames``, ``seek``): only the first frame
  of an animation is decoded, and Pillow caps PNG text and ICC chunks (1 MB each, 64 MB in all).
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
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imgq.errors import ErrorCode, ItemError
from imgq.settings import Settings
from model.rgb import to_rgb

if TYPE_CHECKING:  # torch is the model's: `imgq report` decodes thumbnails here without loading it
    import torch

    from model.classifier import Classifier

# For callers that do not pass the setting (the report's thumbnails, training manifests): its default.
DEFAULT_MAX_JPEG_SCANS: int = Settings.max_jpeg_scans
_SOS = b"\xff\xda"  # JPEG start-of-scan marker

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


def jpeg_scans(data: bytes) -> int:
    """How many scans libjpeg would decode from ``data`` at most: its start-of-scan markers (0xFF 0xDA).

    Exact for the marker stream: in entropy-coded data a 0xFF is always followed by 0x00 (a stuffed byte) or
    an RSTn marker, and fill bytes before a marker are more 0xFF, so every 0xFF 0xDA outside a segment's
    payload is a scan. One inside a payload (an EXIF thumbnail's own scan, stray ICC bytes) only counts too
    many, never too few, and a few extra don't matter against a limit of ~100.

    numpy, not ``data.count(b"\xff\xda")``: bytes.count stops at every 0xFF, which entropy-coded data is full
    of (0.27 ms and the GIL held for a 290 KB photo); finding the rarer 0xDA bytes first and checking the byte
    before each takes 0.08 ms, with the GIL released for the scan.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    before_da = np.flatnonzero(raw[1:] == _SOS[1])  # every i where data[i + 1] is 0xDA
    return int(np.count_nonzero(raw[before_da] == _SOS[0]))


# Pillow parses a JPEG's header (everything before the first scan) and a PNG's chunks in Python, a few
# microseconds a step, so a 20 MB file of empty segments or chunks costs 8-15 s of CPU before libjpeg or zlib
# sees a pixel. Real files take a few dozen steps (a 20 MB PNG even in 1 KB IDAT chunks: 20,000). At these
# limits Pillow spends ~0.1 s at most, and the walks that check them stop there (~20 ms).
MAX_JPEG_HEADER_STEPS = 20_000  # marker segments, fill and junk bytes before the first scan
MAX_PNG_CHUNKS = 20_000


def check_complexity(data: bytes, fmt: str, max_jpeg_scans: int) -> None:
    """ItemError (too_complex) if ``data`` asks for more decoding work than one image may cost."""
    if fmt == "JPEG":
        if _jpeg_header_steps(data) > MAX_JPEG_HEADER_STEPS:
            raise ItemError(
                ErrorCode.TOO_COMPLEX,
                f"JPEG has more than {MAX_JPEG_HEADER_STEPS} marker segments and junk bytes before its first "
                "scan (a real one has a few dozen)",
            )
        scans = jpeg_scans(data)
        if scans > max_jpeg_scans:
            raise ItemError(
                ErrorCode.TOO_COMPLEX,
                f"JPEG has {scans} scans; the limit is {max_jpeg_scans} (IMGQ_MAX_JPEG_SCANS): each scan is a "
                "pass over the whole image",
            )
    elif fmt == "PNG" and _png_chunks(data) > MAX_PNG_CHUNKS:
        raise ItemError(ErrorCode.TOO_COMPLEX, f"PNG has more than {MAX_PNG_CHUNKS} chunks")


def _jpeg_header_steps(data: bytes) -> int:
    """The steps of Pillow's header loop (JpegImagePlugin._open) up to the first scan, counted up to the limit
    plus one: one per marker segment and one per byte of fill (0xFF) or junk between segments."""
    steps, pos, end = 0, 2, len(data)  # after SOI
    while steps <= MAX_JPEG_HEADER_STEPS and pos + 1 < end:
        if data[pos] != 0xFF:  # junk: Pillow reads it a byte at a time
            found = data.find(b"\xff", pos)
            steps, pos = steps + ((found if found >= 0 else end) - pos), found if found >= 0 else end
            continue
        marker = data[pos + 1]
        if marker == 0xDA:
            break
        if marker in (0xFF, 0x00):  # fill, or an escaped 0xFF Pillow skips
            steps, pos = steps + 1, pos + 1 if marker == 0xFF else pos + 2
            continue
        steps += 1
        length = int.from_bytes(data[pos + 2 : pos + 4]) if marker not in _JPEG_STANDALONE else 0
        pos += 2 + length
    return steps


_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: no length field


def _png_chunks(data: bytes) -> int:
    """PNG chunks up to IEND, counted up to the limit plus one."""
    chunks, pos, end = 0, 8, len(data)  # after the signature
    while chunks <= MAX_PNG_CHUNKS and pos + 8 <= end:
        chunks += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4])  # length, type, data, CRC
    return chunks


def decode_image(
    data: bytes, *, max_pixels: int, formats: Sequence[str], draft_size: int | None = None,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> Image.Image:
    """A loaded RGB image from ``data``, or ItemError (not_an_image, too_large, too_complex, decode_error).

    ``draft_size``: for JPEG, let libjpeg scale by 1/2, 1/4 or 1/8 while decoding, as long as the short side
    stays at least ``draft_size`` (much faster than decoding a 24 MP photo in full and resizing).
    ``max_jpeg_scans``: more scans than this is ``too_complex``, refused before anything is decoded.
    """
    fmt = sniff_format(data)
    if fmt is None or fmt not in formats:
        what = "an unknown format" if fmt is None else f"{fmt}, which is not enabled"
        raise ItemError(
            ErrorCode.NOT_AN_IMAGE,
            f"not an image in an allowed format ({', '.join(formats)}): {what}; {_describe(data)}",
        )
    check_complexity(data, fmt, max_jpeg_scans)
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


def prepare_image(body: bytes, model: Classifier, settings: Settings) -> torch.Tensor:
    """Untrusted bytes -> the model's input tensor (ItemError for bad input): the per-image work of serving,
    which the benchmark's ceiling runs too."""
    image = decode_image(body, max_pixels=settings.max_pixels, formats=settings.image_formats,
                         draft_size=model.preprocess.size, max_jpeg_scans=settings.max_jpeg_scans)
    return model.preprocess(image)
