"""What a saved model is: its version, format, hyper-parameters, labels, normalisation and metrics.

A version is either one of imgq's own networks (``format: safetensors``: weights plus the ``config`` that
builds the architecture) or a user's network imported with ``imgq models add`` (``format: torchscript`` or
``export``: an archive that carries its own architecture, so meta.json has ``input_size`` and no config).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from model.net import ModelConfig

Triple = tuple[float, float, float]

# The artifact formats, and the file each one keeps in its version directory (model.checkpoint loads them).
SAFETENSORS = "safetensors"
TORCHSCRIPT = "torchscript"
EXPORT = "export"
ARTIFACT_FILES = {SAFETENSORS: "weights.safetensors", TORCHSCRIPT: "model.ts", EXPORT: "model.pt2"}
ARCHIVE_FORMATS = (TORCHSCRIPT, EXPORT)

# "20261125T083000Z-1a2b3c4d": sorts by time as a plain string; the digest tells same-second versions apart.
VERSION_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


def new_version_id(weights_digest: str, now: datetime | None = None) -> str:
    """UTC time + the first 8 hex digits of the weights file's sha256."""
    if not re.fullmatch(r"[0-9a-f]{8,}", weights_digest):
        raise ValueError(f"weights_digest must be a hex sha256, not {weights_digest!r}")
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{weights_digest[:8]}"


@dataclass(frozen=True, init=False)
class ModelMeta:
    version: str
    classes: tuple[str, ...]
    mean: Triple
    std: Triple
    metrics: dict[str, Any]
    created_at: str
    format: str
    input_size: int
    # imgq's own network; None for an imported archive (it carries its architecture itself).
    architecture: ModelConfig | None

    def __init__(self, version: str, config: ModelConfig | None, classes: tuple[str, ...], mean: Triple,
                 std: Triple, metrics: dict[str, Any], created_at: str, *, format: str = SAFETENSORS,
                 input_size: int | None = None) -> None:
        # A hand-written __init__ keeps the constructor every caller uses (config=...) while an archive has none.
        values = {"version": version, "classes": classes, "mean": mean, "std": std, "metrics": metrics,
                  "created_at": created_at, "format": format, "architecture": config,
                  "input_size": config.input_size if config is not None and input_size is None else input_size}
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check()

    @property
    def config(self) -> ModelConfig:
        """imgq's architecture of a safetensors model (an imported archive has none: ``ValueError``)."""
        if self.architecture is None:
            raise ValueError(f"model {self.version} is an imported {self.format} archive: imgq does not "
                             "know its architecture")
        return self.architecture

    @property
    def arch(self) -> str:
        """What `imgq models list` shows: the architecture, or the archive format of an imported model."""
        return self.architecture.arch if self.architecture is not None else self.format

    def _check(self) -> None:
        if self.format not in ARTIFACT_FILES:
            raise ValueError(f"format {self.format!r}: expected one of {', '.join(ARTIFACT_FILES)}")
        if (self.format == SAFETENSORS) != (self.architecture is not None):
            raise ValueError("a safetensors model needs its config; an imported archive has none")
        if self.architecture is not None:
            if self.input_size != self.architecture.input_size:
                raise ValueError(f"input_size {self.input_size} differs from the config's "
                                 f"{self.architecture.input_size}")
            if len(self.classes) != self.architecture.num_classes:
                raise ValueError(f"{len(self.classes)} class names for a {self.architecture.num_classes}-class "
                                 "model")
        elif not isinstance(self.input_size, int) or isinstance(self.input_size, bool) or self.input_size < 1:
            raise ValueError(f"input_size must be a positive integer, not {self.input_size!r}")
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, not {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names repeat: {list(self.classes)}")
        finite = all(math.isfinite(v) for v in (*self.mean, *self.std))
        if not finite or min(self.std) <= 0:
            raise ValueError(f"bad normalisation mean={self.mean} std={self.std}")

    @property
    def artifact_file(self) -> str:
        """The name of this version's model file in its directory."""
        return ARTIFACT_FILES[self.format]

    def to_dict(self) -> dict[str, Any]:
        shape: dict[str, Any] = ({"config": self.architecture.to_dict()} if self.architecture is not None
                                 else {"input_size": self.input_size})
        return {
            "version": self.version,
            "format": self.format,
            **shape,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "metrics": self.metrics,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMeta:
        """Inverse of :meth:`to_dict`; a ``ValueError`` says which field is wrong. No ``format``: safetensors
        (a registry from before imported models)."""
        fmt = data.get("format", SAFETENSORS)
        if not isinstance(fmt, str) or fmt not in ARTIFACT_FILES:
            raise ValueError(f"format {fmt!r}: expected one of {', '.join(ARTIFACT_FILES)}")
        common = {"version", "classes", "mean", "std", "metrics", "created_at"}
        expected = common | ({"config"} if fmt == SAFETENSORS else {"input_size"})
        if set(data) - {"format"} != expected:
            raise ValueError(f"fields {sorted(data)} differ from {sorted(expected | {'format'})}")
        config = None
        if fmt == SAFETENSORS:
            if not isinstance(data["config"], Mapping):
                raise ValueError("config must be an object")
            config = ModelConfig.from_dict(data["config"])
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
            config=config,
            classes=tuple(classes),
            mean=_triple(data["mean"], "mean"),
            std=_triple(data["std"], "std"),
            metrics=data["metrics"],
            created_at=data["created_at"],
            format=fmt,
            input_size=data.get("input_size"),
        )


def _triple(value: Any, name: str) -> Triple:
    ok = isinstance(value, list) and len(value) == 3
    if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a list of 3 numbers, not {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
