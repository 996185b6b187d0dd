"""Model hyper-parameters (stored with the weights, like nanoGPT's GPTConfig) and the networks they build."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("cnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0")
# The classifier layers of each network, by state-dict prefix: what fine-tuning trains first (the rest is
# the backbone).
HEAD_PREFIXES = {"cnn": "head.", "resnet18": "fc.", "mobilenet_v3_small": "classifier.",
                 "efficientnet_b0": "classifier."}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn"
    num_classes: int = 6
    # The demo shapes are 96 px; 64 keeps them recognisable at 44% of the compute of 96.
    input_size: int = 64
    # cnn only: one conv-BN-ReLU-pool block per entry. With five, the last block's receptive field covers
    # the whole 64 px image; the demo reached 99% in about half the epochs that four blocks needed.
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(_unknown_arch(self.arch))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, not {self.num_classes}")
        # Each cnn block halves the image; the torchvision networks downsample 32x.
        smallest = max(32, 2 ** len(self.channels)) if self.arch == "cnn" else 32
        if self.input_size < smallest:
            raise ValueError(f"input_size must be >= {smallest} for {self.arch}, not {self.input_size}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive widths, not {self.channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; a ``ValueError`` names any unknown or mistyped field."""
        types: dict[str, tuple[type, ...]] = {
            "arch": (str,), "num_classes": (int,), "input_size": (int,), "channels": (list, tuple),
            "dropout": (float, int),
        }
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; expected {sorted(types)}")
        for name, value in data.items():
            if not isinstance(value, types[name]) or isinstance(value, bool):
                raise ValueError(f"model config field {name!r} has a bad value {value!r}")
        values = dict(data)
        if "channels" in values:
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in values["channels"]):
                raise ValueError(f"model config channels must be integers, not {values['channels']!r}")
            values["channels"] = tuple(values["channels"])
        if "dropout" in values:
            values["dropout"] = float(values["dropout"])
        return cls(**values)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised network; torchvision ones get ``weights=None`` so nothing is downloaded."""
    if config.arch == "cnn":
        return SmallCNN(config)
    # Imported here: torchvision's package import costs ~2 s of a worker's start-up, and imgq's own CNN
    # needs none of it.
    from torchvision import models

    module: nn.Module
    if config.arch == "resnet18":
        module = models.resnet18(weights=None, num_classes=config.num_classes)
    elif config.arch == "mobilenet_v3_small":
        module = models.mobilenet_v3_small(weights=None, num_classes=config.num_classes, dropout=config.dropout)
    elif config.arch == "efficientnet_b0":
        module = models.efficientnet_b0(weights=None, num_classes=config.num_classes, dropout=config.dropout)
    else:
        raise ValueError(_unknown_arch(config.arch))
    return module


class SmallCNN(nn.Module):
    """The tutorial CNN: conv-BN-ReLU-maxpool blocks, global average pool, dropout, linear head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = 3
        for out in config.channels:
            blocks += [
                nn.Conv2d(width, out, kernel_size=3, padding=1, bias=False),  # BN supplies the bias
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            width = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(width, config.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.pool(self.features(x)))
        return out


def is_head(arch: str, name: str) -> bool:
    """Whether parameter or module ``name`` belongs to the classifier head of an ``arch`` network."""
    prefix = HEAD_PREFIXES[arch]
    return name.startswith(prefix) or name == prefix.rstrip(".")


def _unknown_arch(arch: str) -> str:
    return f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}"
