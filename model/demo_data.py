"""The built-in demo data set: six shapes drawn with PIL, generated deterministically from a seed.

Each image is one shape in a random colour, size, position and rotation on a noisy gradient
background. Every image has its own RNG seeded from ``(seed, split, class, index)``, so the same
arguments give identical pixels, a larger ``n_per_class`` only appends images, and the splits never share
an image. Training images go through the same JPEG encode/decode as the files ``write_imagefolder``
writes for serving, so the model sees the same artefacts in both places.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "stripes", "cross")
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 96
# Shapes are drawn at 4x and box-filtered down, which anti-aliases their edges.
_SUPERSAMPLE = 4
# Quality used for both the in-memory round trip and the files on disk (PIL's default is 75).
JPEG_QUALITY = 90
# Minimum luma difference between shape and background: keeps every shape visible to a human.
_MIN_CONTRAST = 70.0

Point = tuple[float, float]


def demo_images(split: str, n_per_class: int, seed: int = 0) -> list[tuple[Image.Image, int]]:
    """``n_per_class`` images of each class, as decoded JPEGs, interleaved by class."""
    return [(_jpeg_round_trip(img), label) for img, label in _render_split(split, n_per_class, seed)]


def write_imagefolder(
    out_dir: Path, *, split: str = "train", n_per_class: int = 50, seed: int = 0, fmt: str = "JPEG"
) -> list[tuple[Path, str]]:
    """Write ``out_dir/<class>/<class>_<i>.<ext>`` and return ``(path, label)`` pairs."""
    ext = {"JPEG": "jpg"}.get(fmt.upper(), fmt.lower())
    written: list[tuple[Path, str]] = []
    counters = dict.fromkeys(CLASSES, 0)
    for img, label in _render_split(split, n_per_class, seed):
        name = CLASSES[label]
        path = out_dir / name / f"{name}_{counters[name]}.{ext}"
        counters[name] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format=fmt.upper(), **({"quality": JPEG_QUALITY} if fmt.upper() == "JPEG" else {}))
        written.append((path, name))
    return written


def _render_split(split: str, n_per_class: int, seed: int) -> list[tuple[Image.Image, int]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, not {n_per_class}")
    split_id = SPLITS.index(split)
    return [
        (render(label, np.random.default_rng([seed, split_id, label, i])), label)
        for i in range(n_per_class)
        for label in range(len(CLASSES))
    ]


def render(label: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``CLASSES[label]``."""
    background = _background(rng)
    colour = _shape_colour(rng, background)
    big = IMAGE_SIZE * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    radius = rng.uniform(0.17, 0.36) * IMAGE_SIZE
    # Keep the whole shape inside the frame (with a small margin) so no class is cropped into another.
    margin = radius * 1.05 + 2
    centre = (rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin))
    _draw_shape(ImageDraw.Draw(mask), CLASSES[label], centre, radius, rng.uniform(0, 2 * math.pi), rng)
    alpha = np.asarray(mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32) / 255
    pixels = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(4, 14)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _background(rng: np.random.Generator) -> np.ndarray:
    """A linear gradient between two random colours, in a random direction, as float HxWx3."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    b = a + (b - a) * rng.uniform(0.1, 0.5)  # a mild gradient: the shape stays the strongest edge
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0, 1, IMAGE_SIZE, dtype=np.float32)
    t = (ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle) + 1) / 2
    return (a + (b - a) * t[..., None]).astype(np.float32)


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bg_luma = float(background.mean(axis=(0, 1)) @ luma)
    while True:
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if abs(float(colour @ luma) - bg_luma) >= _MIN_CONTRAST:
            return colour


def _draw_shape(
    draw: ImageDraw.ImageDraw, name: str, centre: Point, radius: float, angle: float, rng: np.random.Generator
) -> None:
    s = _SUPERSAMPLE
    cx, cy, r = centre[0] * s, centre[1] * s, radius * s

    def polygon(points: list[Point], rot: float = angle) -> None:
        cos, sin = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points], fill=255)

    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        h = r / math.sqrt(2)  # corners on the circle of radius r
        polygon([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif name == "triangle":
        polygon([(r * math.cos(angle + k * 2 * math.pi / 3), r * math.sin(angle + k * 2 * math.pi / 3))
                 for k in range(3)], rot=0.0)
    elif name == "star":
        inner = r * rng.uniform(0.38, 0.5)
        polygon([((r if k % 2 == 0 else inner) * math.cos(k * math.pi / 5),
                  (r if k % 2 == 0 else inner) * math.sin(k * math.pi / 5)) for k in range(10)])
    elif name == "stripes":
        n = int(rng.integers(3, 6))
        h = r * 0.75  # a 2h square of bars whose corners stay near the circle of radius r
        pitch = 2 * h / (2 * n - 1)  # equal bar and gap widths
        for k in range(n):
            x0 = -h + 2 * k * pitch
            polygon([(x0, -h), (x0 + pitch, -h), (x0 + pitch, h), (x0, h)])
    elif name == "cross":
        w = r * rng.uniform(0.22, 0.32)
        polygon([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
                 (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)])
    else:
        raise ValueError(f"unknown demo class {name!r}; choose from {', '.join(CLASSES)}")


def _jpeg_round_trip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")
