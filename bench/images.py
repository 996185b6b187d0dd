"""A deterministic set of photo-like JPEGs for the benchmark, written once to ``bench/data/``.

Photo-like means they compress like photos: smooth gradients (sky, walls), a few filled shapes with soft
edges (objects), and mild sensor noise, saved at quality 90 with 4:2:0 chroma. Pure noise would be several
MB and decode unlike any photo; flat colour would be a few KB. Each image has its own RNG seeded from its
index, so the same count always gives the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Landscape sizes a crawler meets most: VGA, XGA and a 2 MP phone export.
SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1024, 768), (1600, 1200))
JPEG_QUALITY = 90
DATA_DIR = Path(__file__).parent / "data"


def render(index: int) -> Image.Image:
    """Image ``index``: gradient + shapes + noise, at ``SIZES[index % len(SIZES)]``."""
    width, height = SIZES[index % len(SIZES)]
    rng = np.random.default_rng(index)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.empty((height, width, 3), np.float32)
    for c in range(3):  # a different tilted gradient per channel
        slope, offset = rng.uniform(-0.15, 0.15, 2), rng.uniform(40, 200)
        base[..., c] = offset + slope[0] * xs * (640 / width) + slope[1] * ys * (480 / height)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(radius=1.5))
    # Texture: fine noise plus a coarser mottle, roughly what a phone's denoiser leaves behind.
    fine = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    coarse = np.asarray(
        Image.fromarray(rng.integers(0, 256, (height // 8, width // 8), dtype=np.uint8)).resize((width, height)),
        np.float32,
    )[..., None]
    pixels = np.asarray(im, np.float32) + fine + (coarse - 128) * 0.12
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return out.getvalue()


def write_images(count: int, root: Path = DATA_DIR) -> list[Path]:
    """``root/img_<i>.jpg`` for i < count; existing files are kept (same index, same bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"img_{i:04d}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(encode(render(i)))
            tmp.replace(path)
        paths.append(path)
    return paths
