"""Where training images come from: the built-in demo set, or an ImageFolder directory.

An ImageFolder is ``root/<class>/<image>``; classes are the sorted sub-directory names. Every file is
decoded once up front, and a file that does not decode is recorded in ``skipped`` with the reason, so
the trainer can report it rather than silently train on less.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from imgq.errors import ImgqError
from model.demo_data import CLASSES, demo_images
from model.preprocess import to_rgb

ImageRef = Image.Image | Path

# The demo set's own recipe, chosen on its validation split: 1,200 training images at 48 px, 8 epochs at a
# one-cycle peak of 1e-2 (batch 16) reach 99% validation accuracy in ~16 CPU-seconds on one thread. 500 a
# class at 64 px took 40-50 s on two idle cores; 3e-3 needed more epochs (95% at 6).
DEMO_TRAIN_PER_CLASS = 200
DEMO_VAL_PER_CLASS = 100
DEMO_INPUT_SIZE = 48
DEMO_EPOCHS = 8
DEMO_LR = 1e-2


@dataclass(frozen=True)
class LabeledImages:
    classes: tuple[str, ...]
    items: tuple[tuple[ImageRef, int], ...]
    # (file or URL, why) for every item that would not fetch or decode.
    skipped: tuple[tuple[Path | str, str], ...] = ()
    # A fixed validation set that split() returns instead of carving one out (the demo's own val split).
    holdout: LabeledImages | None = None
    # What this source is known to train well with, used where the TrainConfig leaves the choice open (the
    # demo set's own recipe); None: model.recipe chooses from the images.
    input_size: int | None = None
    epochs: int | None = None
    lr: float | None = None

    def __len__(self) -> int:
        return len(self.items)

    def split(self, val_fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
        """(train, validation): ``val_fraction`` of each class, chosen by ``seed``, goes to validation."""
        if self.holdout is not None:
            return replace(self, holdout=None), self.holdout
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
        rng = np.random.default_rng(seed)
        labels = np.array([label for _, label in self.items])
        val_idx: set[int] = set()
        for label in range(len(self.classes)):
            idx = rng.permutation(np.flatnonzero(labels == label))
            # At least one of each class on both sides whenever the class has two images.
            n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1) if len(idx) > 1 else 0
            val_idx.update(int(i) for i in idx[:n_val])
        train = tuple(item for i, item in enumerate(self.items) if i not in val_idx)
        val = tuple(item for i, item in enumerate(self.items) if i in val_idx)
        return replace(self, items=train, holdout=None), replace(self, items=val, holdout=None)


def open_image(ref: ImageRef) -> Image.Image:
    """An upright RGB image from a path, or the image itself when it is already in memory."""
    if isinstance(ref, Image.Image):
        return ref if ref.mode == "RGB" else to_rgb(ref)
    with warnings.catch_warnings():
        # A decompression-bomb warning means "refuse", like every other decode failure here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(ref) as img:
            img.load()
            return to_rgb(img)


def load_source(source: str) -> LabeledImages:
    """``"demo"`` (the built-in shapes) or the path of an ImageFolder directory."""
    if source == "demo":
        return _demo()
    root = Path(source)
    if not root.is_dir():
        raise ImgqError(f"training data {source!r} is neither 'demo' nor a directory")
    return load_imagefolder(root)


def load_imagefolder(root: Path) -> LabeledImages:
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(classes) < 2:
        raise ImgqError(f"{root} must hold one sub-directory per class (at least 2), found {list(classes)}")
    items: list[tuple[ImageRef, int]] = []
    skipped: list[tuple[Path, str]] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        before = len(items)
        for path in files:
            try:
                open_image(path)
            except Exception as exc:  # Pillow raises many types for bad files (its fuzzing docs agree)
                skipped.append((path, f"{type(exc).__name__}: {exc}"))
            else:
                items.append((path, label))
        if len(items) == before:
            raise ImgqError(f"class {name!r} has no readable images in {root / name}")
    return LabeledImages(classes=classes, items=tuple(items), skipped=tuple(skipped))


def _demo() -> LabeledImages:
    val = LabeledImages(classes=CLASSES, items=tuple(demo_images("val", DEMO_VAL_PER_CLASS)))
    train = tuple(demo_images("train", DEMO_TRAIN_PER_CLASS))
    return LabeledImages(classes=CLASSES, items=train, holdout=val, input_size=DEMO_INPUT_SIZE, epochs=DEMO_EPOCHS,
                         lr=DEMO_LR)
