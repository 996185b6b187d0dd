"""worker.decode over the odd, hostile and broken images of tests/images.py, plus a short fuzz run."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgq.errors import ErrorCode, ItemError
from imgq.settings import IMAGE_FORMATS
from tests import images
from worker.decode import decode_image, sniff_format

MAX_PIXELS = 1_000_000


def decode(data: bytes, **kwargs: object) -> Image.Image:
    options: dict[str, object] = {"max_pixels": MAX_PIXELS, "formats": IMAGE_FORMATS, **kwargs}
    return decode_image(data, **options)  # type: ignore[arg-type]


def error_code(data: bytes, **kwargs: object) -> ErrorCode:
    with pytest.raises(ItemError) as info:
        decode(data, **kwargs)
    return info.value.code


def assert_rgb(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert im.mode == "RGB" and im.size == size
    pixels = np.asarray(im)  # loaded: reading the pixels must not hit the source again
    assert pixels.shape == (size[1], size[0], 3) and pixels.dtype == np.uint8
    return pixels


@pytest.mark.parametrize("name", sorted(images.ODD_IMAGES))
def test_odd_images_become_rgb(name: str) -> None:
    make, size = images.ODD_IMAGES[name]
    assert_rgb(decode(make()), size)


@pytest.mark.parametrize(("make", "fmt"), [
    (images.jpeg, "JPEG"), (images.png, "PNG"), (images.animated_gif, "GIF"), (images.webp, "WEBP"),
    (images.bmp, "BMP"), (images.tiff, "TIFF"), (images.html_page, None), (images.random_bytes, None),
    (lambda: b"RIFF\x24\x00\x00\x00WAVEfmt ", None), (lambda: b"", None),
])
def test_sniff_format_by_magic_bytes(make: Callable[[], bytes], fmt: str | None) -> None:
    assert sniff_format(make()) == fmt


@pytest.mark.parametrize(("name", "left", "right"), [
    ("rgba_png", images.RED, (255, 255, 255)),
    ("p_transparent_png", images.RED, (255, 255, 255)),
    ("p_transparent_gif", images.RED, (255, 255, 255)),
    ("la_png", (100, 100, 100), (255, 255, 255)),
])
def test_transparency_composited_on_white(name: str, left: tuple[int, ...], right: tuple[int, ...]) -> None:
    make, size = images.ODD_IMAGES[name]
    pixels = assert_rgb(decode(make()), size)
    assert tuple(pixels[0, 0]) == left and tuple(pixels[0, -1]) == right


@pytest.mark.parametrize("name", ["i16_ramp_png", "i16b_tiff"])
def test_16_bit_scaled_not_clipped(name: str) -> None:
    make, size = images.ODD_IMAGES[name]
    row = assert_rgb(decode(make()), size)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # still a ramp
    assert len(np.unique(row)) > 200  # distinct mid-range values, not a wall of 255
    assert abs(row[size[0] // 2] - 128) <= 2


@pytest.mark.parametrize("name", ["int32_tiff", "float_tiff"])
def test_wide_greyscale_scaled_to_full_range(name: str) -> None:
    make, size = images.ODD_IMAGES[name]
    row = assert_rgb(decode(make()), size)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) > 0)


def test_cmyk_colours_survive() -> None:
    pixels = assert_rgb(decode(images.cmyk_jpeg()), (64, 48))
    top, bottom = pixels[2, 2].astype(int), pixels[-2, -2].astype(int)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


@pytest.mark.parametrize("name", ["animated_gif", "animated_webp"])
def test_animation_gives_the_first_frame(name: str) -> None:
    make, size = images.ODD_IMAGES[name]
    r, g, b = assert_rgb(decode(make()), size)[size[1] // 2, size[0] // 2].astype(int)
    assert r > 150 and g < 80 and b < 80  # frame 0 is red


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_comes_out_upright(orientation: int) -> None:
    pixels = assert_rgb(decode(images.exif_rotated_jpeg((48, 64), orientation)), (48, 64))
    top, bottom = pixels[2, 24].astype(int), pixels[-3, 24].astype(int)
    assert top[0] > 150 > top[2], "red must be on top once upright"
    assert bottom[2] > 150 > bottom[0]


# -- refusals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
@pytest.mark.parametrize("side", [60_000, 2_000], ids=["beyond-pillow-limit", "beyond-max-pixels"])
def test_bombs_refused_before_allocating(fmt: str, side: int) -> None:
    source = {"PNG": images.png, "JPEG": images.jpeg, "GIF": images.animated_gif, "BMP": images.bmp}[fmt]()
    bomb = images.with_declared_size(source, fmt, side, side)
    start = time.perf_counter()
    assert error_code(bomb) is ErrorCode.TOO_LARGE
    # 2000x2000 RGB would be a 12 MB allocation and 60000^2 over 10 GB; both are refused in well under 50 ms.
    assert time.perf_counter() - start < 0.05


def test_png_bomb_header() -> None:
    assert error_code(images.png_bomb(100_000, 100_000)) is ErrorCode.TOO_LARGE


def test_max_pixels_is_the_setting_not_pillows() -> None:
    data = images.png((200, 100))
    assert error_code(data, max_pixels=19_999) is ErrorCode.TOO_LARGE
    assert decode(data, max_pixels=20_000).size == (200, 100)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.99])
@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_truncated_is_decode_error(fmt: str, keep: float) -> None:
    assert error_code(images.truncated(images.noisy(fmt), keep)) is ErrorCode.DECODE_ERROR


@pytest.mark.parametrize(("make", "keep"), [
    (lambda: images.jpeg((300, 200)), 0.5),
    (lambda: images.png((300, 200)), 0.5),
    (images.jpeg, 0.02),  # little more than the magic bytes
    (images.png, 0.1),
])
def test_truncated_smooth_images(make: Callable[[], bytes], keep: float) -> None:
    assert error_code(images.truncated(make(), keep)) is ErrorCode.DECODE_ERROR


def test_corrupt_png_chunk_is_decode_error() -> None:
    data = bytearray(images.png((300, 200)))
    data[data.index(b"IDAT") + 10] ^= 0xFF  # the CRC no longer matches
    assert error_code(bytes(data)) is ErrorCode.DECODE_ERROR


@pytest.mark.parametrize("data", [
    images.html_page(), images.random_bytes(), b"", b"GIF", b"%PDF-1.7\n", b'{"image": "cat.jpg"}',
    b"RIFF\x24\x00\x00\x00WAVEfmt ", b"\x00\x00\x01\x00\x01\x00",  # ICO: Pillow knows it, we don't allow it
], ids=["html", "random", "empty", "short", "pdf", "json", "wav", "ico"])
def test_not_an_image(data: bytes) -> None:
    assert error_code(data) is ErrorCode.NOT_AN_IMAGE


def test_only_allowed_formats_decode() -> None:
    assert error_code(images.png(), formats=("JPEG",)) is ErrorCode.NOT_AN_IMAGE
    assert decode(images.png(), formats=("PNG",)).size == (64, 48)


def test_not_an_image_message_helps() -> None:
    with pytest.raises(ItemError) as info:
        decode(images.html_page())
    assert "JPEG" in info.value.message and "<!DOCTYPE" in info.value.message


# -- draft --------------------------------------------------------------------------------------------------

def test_draft_decodes_large_jpeg_near_the_target() -> None:
    data = images.jpeg((1024, 768))
    assert decode(data).size == (1024, 768)
    small = decode(data, draft_size=224)
    assert min(small.size) >= 224 and small.size[0] < 1024
    assert small.mode == "RGB"
    assert decode(data, draft_size=2000).size == (1024, 768)  # never upscales, never below the target


def test_draft_keeps_orientation_and_ignores_other_formats() -> None:
    rotated = decode(images.exif_rotated_jpeg((480, 640)), draft_size=100)
    assert rotated.size[0] < rotated.size[1] and min(rotated.size) >= 100
    assert decode(images.png((640, 480)), draft_size=100).size == (640, 480)


def test_decode_is_thread_safe() -> None:
    blobs = [make() for make, _ in images.ODD_IMAGES.values()] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, blobs))
    assert all(im.mode == "RGB" for im in results)


# -- fuzz ---------------------------------------------------------------------------------------------------

SEEDS = [make() for make, _ in images.ODD_IMAGES.values()] + [images.png_bomb(3000, 3000)]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        if action == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif action == "cut":
            del data[pos:]
            if not data:
                break
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=200, deadline=timedelta(seconds=2), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_images(), st.binary(max_size=512)))
def test_fuzz_only_rgb_or_item_error(data: bytes) -> None:
    try:
        im = decode(data, draft_size=64)
    except ItemError:
        return
    assert im.mode == "RGB" and min(im.size) > 0
    np.asarray(im)
