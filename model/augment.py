"""Training augmentation, one documented choice: ``none``, ``light`` (the default) or ``standard``.

Augmentation runs on a whole batch of resized pixels at once (one ``grid_sample`` per batch): the images are
first resized exactly as serving resizes them (:class:`model.preprocess.Preprocess`), so with ``none`` the
training tensors are the serving tensors bit for bit, and every choice only moves, scales and recolours
what serving would see.

    none      nothing: the serving tensors
    light     small zoom, shift and turn (+-10 degrees), brightness and contrast; never a mirror image, so
              digits, letters and anything with a handedness keep their meaning (the default)
    standard  light's moves, larger, plus a horizontal flip and saturation: for photographs, textures,
              faces and objects, where a mirrored image is the same class

Random draws come from the ``generator`` given (the trainer seeds its own), so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional

AUGMENTATIONS = ("none", "light", "standard")
DEFAULT_AUGMENT = "light"


@dataclass(frozen=True)
class Policy:
    zoom: tuple[float, float]  # >1 zooms in (a crop), <1 out (the border is repeated)
    shift: float  # at most this fraction of the image, each axis
    turn_deg: float
    hflip: bool
    brightness: float  # factor drawn from 1 +- this
    contrast: float
    saturation: float


POLICIES: dict[str, Policy | None] = {
    "none": None,
    # Mild enough for the demo shapes and for digits: a 6 turned 10 degrees is still a 6, never a 9.
    "light": Policy(zoom=(0.9, 1.12), shift=0.08, turn_deg=10.0, hflip=False, brightness=0.2, contrast=0.2,
                    saturation=0.0),
    "standard": Policy(zoom=(0.9, 1.3), shift=0.12, turn_deg=15.0, hflip=True, brightness=0.3, contrast=0.3,
                       saturation=0.3),
}


def policy(name: str) -> Policy | None:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}") from None


def augment(pixels: torch.Tensor, chosen: Policy | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 N x 3 x S x S resized pixels -> float32 in [0, 1], augmented by ``chosen`` (None: unchanged)."""
    x = pixels.to(torch.float32).mul_(1.0 / 255)
    if chosen is None or not len(x):
        return x
    n, device = len(x), x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).to(device) * (high - low) + low

    # Output -> input coordinates (affine_grid's theta): rotate, divide by the zoom, shift; flip x if drawn.
    angle = uniform(-chosen.turn_deg, chosen.turn_deg) * (math.pi / 180)
    zoom = torch.exp(uniform(math.log(chosen.zoom[0]), math.log(chosen.zoom[1])))
    flip = (torch.rand(n, generator=generator).to(device) < 0.5).float() * 2 - 1 if chosen.hflip else None
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if flip is not None:
        theta[:, :, 0] *= flip[:, None]
    theta[:, 0, 2] = uniform(-chosen.shift, chosen.shift) * 2  # [-1, 1] spans the image: 2 per image width
    theta[:, 1, 2] = uniform(-chosen.shift, chosen.shift) * 2
    grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    x = x * uniform(1 - chosen.brightness, 1 + chosen.brightness)[:, None, None, None]
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=device)[None, :, None, None]).sum(1, keepdim=True)
    if chosen.saturation:
        x = grey + (x - grey) * uniform(1 - chosen.saturation, 1 + chosen.saturation)[:, None, None, None]
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(1 - chosen.contrast, 1 + chosen.contrast)[:, None, None, None]
    return x.clamp_(0.0, 1.0)
