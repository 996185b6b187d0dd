"""What a saved model is: its version, hyper-parameters, labels, normalisation and training metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from model.net import ModelConfig

Triple = tuple[float, float, float]

# "20261125T083000Z-1a2b3c4d": sorts by time as a plain string; the digest tells same-second versions apart.
VERSION_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


def new_version_id(weights_digest: str, now: datetime | None = None) -> str:
    """UTC time + the first 8 hex digits of the weights file's sha256."""
    if not re.fullmatch(r"[0-9a-f]{8,}", weights_digest):
        raise ValueError(f"weights_digest must be a hex sha256, not {weights_digest!r}")
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{weights_digest[:8]}"


@dataclass(frozen=True)
class ModelMeta:
    version: str
    config: ModelConfig
    classes: tuple[str, ...]
    mean: Triple
    std: Triple
    metrics: dict[str, Any]
    created_at: str

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def __post_init__(self) -> None:
        if len(self.classes) != self.config.num_classes:
            raise ValueError(f"{len(self.classes)} class names for a {self.config.num_classes}-class model")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names repeat: {list(self.classes)}")
        finite = all(math.isfinite(v) for v in (*self.mean, *self.std))
        if not finite or min(self.std) <= 0:
            raise ValueError(f"bad normalisation mean={self.mean} std={self.std}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "config": self.config.to_dict(),
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "metrics": self.metrics,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMeta:
        """Inverse of :meth:`to_dict`; a ``ValueError`` says which field is wrong."""
        expected = {"version", "config", "classes", "mean", "std", "metrics", "created_at"}
        if set(data) != expected:
            raise ValueError(f"fields {sorted(data)} differ from {sorted(expected)}")
        if not isinstance(data["config"], Mapping):
            raise ValueError("config must be an object")
        if not isinstance(data["metrics"], dict):
            raise ValueError("metrics must be an object")
        for name in ("version", "created_at"):
            if not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
            raise ValueError("classes must be a list of non-empty strings")
        return cls(
            version=data["version"],
            config=ModelConfig.from_dict(data["config"]),
            classes=tuple(classes),
            mean=_triple(data["mean"], "mean"),
            std=_triple(data["std"], "std"),
            metrics=data["metrics"],
            created_at=data["created_at"],
        )


def _triple(value: Any, name: str) -> Triple:
    ok = isinstance(value, list) and len(value) == 3
    if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a list of 3 numbers, not {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
