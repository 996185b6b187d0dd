"""The image -> tensor step, one callable shared by training and serving (torchvision's presets).

Serving and validation use :class:`Preprocess`; training uses the same resize and normalise with
augmentation (:mod:`model.augment`) between them, so the two cannot drift apart: with ``none`` the training
tensors are the serving ones bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.augment import DEFAULT_AUGMENT, policy
from model.augment import augment as augment_pixels
from model.rgb import to_rgb as to_rgb  # moved to torch-free model.rgb (`imgq report`); re-exported for callers

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
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @functools.cached_property
    def transform(self) -> Any:
        """The definition, as torchvision v2 transforms; __call__ computes the same bit for bit
        (tests/test_model.py checks). Built on demand: importing torchvision costs ~2 s of a worker's start."""
        from torchvision.transforms import v2

        return v2.Compose([v2.Resize((self.size, self.size), antialias=True), v2.PILToTensor(),
                           v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean=list(self.mean), std=list(self.std))])

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
