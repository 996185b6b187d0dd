"""Odd, hostile and ordinary image bytes (and HTTP bodies) for tests, generated in memory.

Every generator is deterministic and cheap (milliseconds). Pixel content is chosen so a test can tell
orientation and scaling apart: :func:`exif_rotated_jpeg` is red on top once upright, :func:`i16_ramp_png` is a
ramp over the whole 16-bit range.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from functools import cache
from typing import Any

from PIL import Image

RED = (220, 20, 20)
BLUE = (20, 20, 220)


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def two_tone(size: tuple[int, int] = (64, 48), top: tuple[int, int, int] = RED,
             bottom: tuple[int, int, int] = BLUE) -> Image.Image:
    """RGB image, ``top`` colour above the middle, ``bottom`` below."""
    im = Image.new("RGB", size, bottom)
    im.paste(top, (0, 0, size[0], size[1] // 2))
    return im


def jpeg(size: tuple[int, int] = (64, 48), quality: int = 90) -> bytes:
    return encode(two_tone(size), "JPEG", quality=quality)


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size), "PNG")


def webp(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size), "WEBP")


def bmp(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size), "BMP")


def tiff(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size), "TIFF")


def cmyk_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size).convert("CMYK"), "JPEG")


def grey_png(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size).convert("L"), "PNG")


def one_bit_png(size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(two_tone(size).convert("1"), "PNG")


def rgba_png(size: tuple[int, int] = (64, 48)) -> bytes:
    """Left half opaque red, right half fully transparent (decodes to white there)."""
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste((*RED, 255), (0, 0, size[0] // 2, size[1]))
    return encode(im, "PNG")


def la_png(size: tuple[int, int] = (64, 48)) -> bytes:
    im = Image.new("LA", size, (0, 0))
    im.paste((100, 255), (0, 0, size[0] // 2, size[1]))
    return encode(im, "PNG")


def p_transparent_png(size: tuple[int, int] = (64, 48)) -> bytes:
    """Palette image whose index 0 is transparent (the right half)."""
    im = Image.new("P", size, 0)
    im.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    im.paste(1, (0, 0, size[0] // 2, size[1]))
    return encode(im, "PNG", transparency=0)


def p_transparent_gif(size: tuple[int, int] = (64, 48)) -> bytes:
    im = Image.new("P", size, 0)
    im.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    im.paste(1, (0, 0, size[0] // 2, size[1]))
    return encode(im, "GIF", transparency=0)


def i16_ramp_png(size: tuple[int, int] = (256, 4)) -> bytes:
    """16-bit greyscale, a horizontal ramp 0..65535: clipping at 255 would make most of it white."""
    width, height = size
    row = [round(x * 65535 / (width - 1)) for x in range(width)]
    im = Image.new("I;16", size)
    im.putdata(row * height)
    return encode(im, "PNG")


def i16_tiff(mode: str = "I;16B", size: tuple[int, int] = (256, 4)) -> bytes:
    width, height = size
    im = Image.new(mode, size)
    im.putdata([round(x * 65535 / (width - 1)) for x in range(width)] * height)
    return encode(im, "TIFF")


def int32_tiff(size: tuple[int, int] = (64, 4)) -> bytes:
    im = Image.new("I", size)
    im.putdata([x * 100_000 - 3_000_000 for x in range(size[0])] * size[1])
    return encode(im, "TIFF")


def float_tiff(size: tuple[int, int] = (64, 4)) -> bytes:
    im = Image.new("F", size)
    im.putdata([x / (size[0] - 1) for x in range(size[0])] * size[1])
    return encode(im, "TIFF")


def animated_gif(size: tuple[int, int] = (64, 48), frames: int = 3) -> bytes:
    colours = [RED, BLUE, (20, 220, 20)]
    ims = [Image.new("RGB", size, colours[i % 3]) for i in range(frames)]
    return encode(ims[0], "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)


def animated_webp(size: tuple[int, int] = (64, 48), frames: int = 3) -> bytes:
    colours = [RED, BLUE, (20, 220, 20)]
    ims = [Image.new("RGB", size, colours[i % 3]) for i in range(frames)]
    return encode(ims[0], "WEBP", save_all=True, append_images=ims[1:], duration=100)


def exif_rotated_jpeg(upright_size: tuple[int, int] = (48, 64), orientation: int = 6) -> bytes:
    """Stored sideways with an EXIF Orientation tag; once turned upright it is ``upright_size``, red on top."""
    upright = two_tone(upright_size)
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", exif=exif.tobytes(), quality=95)


def noisy(fmt: str, size: tuple[int, int] = (300, 200), seed: int = 0) -> bytes:
    """Random pixels: incompressible, so cutting the file anywhere cuts pixel data (of the only frame)."""
    rng = random.Random(seed)
    im = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    return encode(im.convert("P") if fmt == "GIF" else im, fmt)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def html_page() -> bytes:
    """What a misconfigured server sends as image/jpeg: its error page."""
    return b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not Found</body></html>\n"


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@cache
def gzip_bomb(inflated: int = 64 * 1024 * 1024) -> bytes:
    """gzip of ``inflated`` zero bytes (~1000:1), built incrementally so the inflated form never exists."""
    z = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b"\0" * (1024 * 1024)
    parts = [z.compress(block) for _ in range(inflated // len(block))]
    parts.append(z.flush())
    return b"".join(parts)


def gzip_body(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return z.compress(data) + z.flush()


# Every odd-but-valid image, by name: (bytes factory, decoded (width, height)).
ODD_IMAGES: dict[str, tuple[Any, tuple[int, int]]] = {
    "jpeg": (jpeg, (64, 48)),
    "png": (png, (64, 48)),
    "webp": (webp, (64, 48)),
    "bmp": (bmp, (64, 48)),
    "tiff": (tiff, (64, 48)),
    "cmyk_jpeg": (cmyk_jpeg, (64, 48)),
    "grey_png": (grey_png, (64, 48)),
    "one_bit_png": (one_bit_png, (64, 48)),
    "rgba_png": (rgba_png, (64, 48)),
    "la_png": (la_png, (64, 48)),
    "p_transparent_png": (p_transparent_png, (64, 48)),
    "p_transparent_gif": (p_transparent_gif, (64, 48)),
    "i16_ramp_png": (i16_ramp_png, (256, 4)),
    "i16b_tiff": (i16_tiff, (256, 4)),
    "int32_tiff": (int32_tiff, (64, 4)),
    "float_tiff": (float_tiff, (64, 4)),
    "animated_gif": (animated_gif, (64, 48)),
    "animated_webp": (animated_webp, (64, 48)),
    "exif_rotated_jpeg": (exif_rotated_jpeg, (48, 64)),
}


def with_declared_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """``data`` with its header patched to declare ``width`` x ``height`` (the pixel data stays tiny)."""
    out = bytearray(data)
    if fmt == "PNG":
        return png_bomb(width, height)
    if fmt == "JPEG":
        sof = next(i for i in range(2, len(out) - 1) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2))
        out[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    elif fmt == "GIF":
        out[6:10] = struct.pack("<HH", width, height)
        desc = out.index(b"\x2c", 13)  # image descriptor
        out[desc + 5 : desc + 9] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        out[18:26] = struct.pack("<ii", width, height)
    else:
        raise ValueError(f"no header patcher for {fmt}")
    return bytes(out)
