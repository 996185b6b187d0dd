"""The image -> tensor step, one callable shared by training and serving (torchvision's presets).

Serving and validation use :class:`Preprocess`; training uses the same resize and normalise with
augmentation (:mod:`model.augment`) between them, so the two cannot drift apart: with ``none`` the training
tensors are the serving ones bit for bit.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from model.augment import DEFAULT_AUGMENT, policy
from model.augment import augment as augment_pixels

Triple = tuple[float, float, float]

# ImageNet statistics: the usual choice, and right for the torchvision architectures.
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)


class Preprocess:
    """Resize to ``size`` x ``size``, scale to [0, 1], normalise: an RGB image -> float32 3xSxS."""

    def __init__(self, *, size: int, mean: Triple, std: Triple) -> None:
        self.size = size
        self.mean = mean
        self.std = std
        # The definition; __call__ computes the same bit for bit (tests/test_model.py checks).
        self.transform = v2.Compose([v2.Resize((size, size), antialias=True), *_to_normalised(mean, std)])
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # self.transform's steps written out (v2 resizes a PIL image with Pillow's bilinear, which antialiases),
        # without v2's per-call dispatch: ~0.1 ms of Python per image, GIL held, in every decode thread.
        return self.pixels(img).to(torch.float32).mul_(1.0 / 255).sub(self._mean).div_(self._std)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """The resize step alone: uint8 3 x size x size (training caches these and augments them)."""
        resized = np.array(img.resize((self.size, self.size), Image.Resampling.BILINEAR))
        pixels = torch.from_numpy(resized)
        return pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.unsqueeze(0)

    def normalise(self, scaled: torch.Tensor) -> torch.Tensor:
        """The last step, for one image or a batch already scaled to [0, 1]: the same arithmetic as __call__."""
        return scaled.sub(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, mean={self.mean}, std={self.std})"


class TrainPreprocess(Preprocess):
    """:class:`Preprocess` with training augmentation (:mod:`model.augment`) between its resize and normalise.

    ``augment`` is ``none``, ``light`` (default: no mirror images, safe for digits and text) or ``standard``.
    One image at a time, drawing from torch's global RNG (seed it); ``train()`` runs the same
    :func:`model.augment.augment` on whole batches with its own generator.
    """

    def __init__(self, *, size: int, mean: Triple, std: Triple, augment: str = DEFAULT_AUGMENT) -> None:
        super().__init__(size=size, mean=mean, std=std)
        self.augment = augment
        self.policy = policy(augment)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalise(augment_pixels(self.pixels(img)[None], self.policy))[0]

    def __repr__(self) -> str:
        return f"TrainPreprocess(size={self.size}, mean={self.mean}, std={self.std}, augment={self.augment!r})"


def _to_normalised(mean: Triple, std: Triple) -> list[v2.Transform]:
    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


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
