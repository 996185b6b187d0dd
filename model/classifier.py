"""A loaded model ready to serve: batch of tensors (or images) in, top-k labels with probabilities out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from model.meta import ModelMeta
from model.preprocess import Preprocess

Prediction = list[tuple[str, float]]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when torch sees a GPU, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Classifier:
    """One model version in eval mode on one device; ``preprocess`` is the preset it was validated with."""

    def __init__(self, module: nn.Module, meta: ModelMeta, device: str | torch.device = "cpu") -> None:
        self.meta = meta
        self.version = meta.version
        self.classes = meta.classes
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.preprocess = Preprocess(size=meta.config.input_size, mean=meta.mean, std=meta.std)

    def predict(self, batch: torch.Tensor, k: int = 3) -> list[Prediction]:
        """Top-``k`` ``(label, probability)`` per row, most likely first; ``k`` is capped at the classes."""
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        size = self.meta.config.input_size
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a batch of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return []
        k = min(k, len(self.classes))
        with torch.inference_mode():
            logits = self.module(batch.to(self.device, non_blocking=True))
            top_p, top_i = logits.float().softmax(dim=1).topk(k, dim=1)
        probs: list[list[float]] = top_p.cpu().tolist()
        indices: list[list[int]] = top_i.cpu().tolist()
        return [[(self.classes[i], p) for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(indices, probs, strict=True)]

    def predict_images(self, images: Sequence[Image.Image], k: int = 3) -> list[Prediction]:
        """Preprocess RGB images with this model's preset, then :meth:`predict`."""
        if not images:
            return []
        return self.predict(torch.stack([self.preprocess(img) for img in images]), k)

    def __repr__(self) -> str:
        return f"Classifier(version={self.version!r}, arch={self.meta.config.arch!r}, device={self.device})"
