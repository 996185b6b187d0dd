"""The image -> tensor step, one callable shared by training and serving (torchvision's presets).

Serving and validation use :class:`Preprocess`; training uses :class:`TrainPreprocess`, which adds
augmentation in front of the same resize/normalise so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

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
        self.transform = v2.Compose([v2.Resize((size, size), antialias=True), *_to_normalised(mean, std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        out: torch.Tensor = self.transform(img)
        return out

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, mean={self.mean}, std={self.std})"


class TrainPreprocess(Preprocess):
    """:class:`Preprocess` plus light augmentation; draws from torch's global RNG (seed it)."""

    def __init__(self, *, size: int, mean: Triple, std: Triple) -> None:
        super().__init__(size=size, mean=mean, std=std)
        self.transform = v2.Compose([
            # A mild crop: the demo shapes must stay whole, or a cropped star could look like a cross.
            v2.RandomResizedCrop((size, size), scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.PILToTensor(),
            # Jitter after the uint8 conversion: much cheaper on a small tensor than on a PIL image.
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ])


def _to_normalised(mean: Triple, std: Triple) -> list[v2.Transform]:
    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> upright 8-bit RGB: EXIF rotation applied, 16-bit scaled (not clipped)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("RGB") clips 16-bit values at 255; scale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif (img.mode == "P" and "transparency" in img.info) or img.mode in ("PA", "LA"):
        img = img.convert("RGBA")  # converting these straight to RGB warns and mis-handles transparency
    return img if img.mode == "RGB" else img.convert("RGB")
