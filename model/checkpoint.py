"""Model artifacts on disk: ``weights.safetensors`` + ``meta.json``. Nothing is ever unpickled.

A model file is a program if it is a pickle ("models are programs", PyTorch's security notes), so weights
are safetensors only and everything about them is checked before the first forward pass: the format, every
tensor name, shape and dtype against the architecture in meta.json, and that every value is finite.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from imgq.errors import ImgqError
from model.classifier import Classifier, resolve_device
from model.meta import ModelMeta, new_version_id
from model.net import build_model

__all__ = [
    "META_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "Classifier",
    "ModelMeta",
    "load_checkpoint",
    "new_version_id",
    "read_meta",
    "save_checkpoint",
    "serialize_weights",
    "write_checkpoint",
]

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"


class ArtifactError(ImgqError):
    """An artifact was refused: not safetensors, truncated, wrong tensors, non-finite values, bad meta."""


def serialize_weights(model: nn.Module) -> bytes:
    """The safetensors bytes of ``model``'s state dict (the exact content of ``weights.safetensors``)."""
    # contiguous(): safetensors refuses strided views, and channels_last training leaves those behind.
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    return safetensors.torch.save(tensors)


def save_checkpoint(model: nn.Module, meta: ModelMeta, directory: Path) -> Path:
    """Write ``directory/weights.safetensors`` and ``directory/meta.json``; returns ``directory``."""
    write_checkpoint(serialize_weights(model), meta, directory)
    return directory


def write_checkpoint(weights: bytes, meta: ModelMeta, directory: Path) -> None:
    """Each file goes to a temporary name first and is renamed over the old one: readers never see half."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / WEIGHTS_FILE, weights)
    _write_atomic(directory / META_FILE, (json.dumps(meta.to_dict(), indent=2) + "\n").encode())


def read_meta(directory: Path) -> ModelMeta:
    path = directory / META_FILE
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    try:
        return ModelMeta.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: bad metadata: {exc}") from None


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> Classifier:
    """Validate the artifact in ``directory`` and return it ready to serve, in eval mode on ``device``."""
    meta = read_meta(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        tensors = safetensors.torch.load_file(path)
    except Exception as exc:  # safetensors raises its own error types for every malformed file
        raise ArtifactError(f"{path}: not a valid safetensors file: {exc}") from None
    module = build_model(meta.config)
    _check_tensors(path, tensors, module.state_dict())
    module.load_state_dict(tensors, strict=True)
    return Classifier(module, meta, resolve_device(device))


def _check_tensors(path: Path, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ArtifactError(f"{path}: tensor names do not match the architecture: "
                            f"missing {_few(missing)}, unexpected {_few(extra)}")
    for name, ref in want.items():
        t = got[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ArtifactError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                                f"expected {ref.dtype} {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {name!r} contains NaN or Inf")


def _few(names: list[str]) -> str:
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more if names else "[]"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")  # unique per writer
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
