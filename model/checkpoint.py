"""Model artifacts on disk: ``meta.json`` + ``weights.safetensors``, ``model.ts`` or ``model.pt2``. Nothing
is ever unpickled.

A model file is a program if it is a pickle ("models are programs", PyTorch's security notes), so imgq's own
networks are safetensors weights, and everything about them is checked before the first forward pass: the
format, every tensor name, shape and dtype against the architecture in meta.json, and that every value is
finite. A user's network is a TorchScript or torch.export archive (``meta.json``'s ``format``), checked and
loaded by :mod:`model.archive`, then run once on a probe batch: it must give finite [N, classes] logits, the
same twice.
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
from model.archive import ArchiveError, load_export, load_torchscript
from model.classifier import Classifier, resolve_device
from model.meta import SAFETENSORS, TORCHSCRIPT, ModelMeta, new_version_id
from model.net import build_model

__all__ = [
    "META_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "Classifier",
    "ModelMeta",
    "load_checkpoint",
    "new_version_id",
    "probe_module",
    "read_meta",
    "save_checkpoint",
    "serialize_weights",
    "write_atomic",
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


def write_checkpoint(weights: bytes | None, meta: ModelMeta, directory: Path) -> None:
    """Each file goes to a temporary name first and is renamed over the old one: readers never see half.
    ``weights`` None: meta.json only (an imported archive is written beside it by the caller)."""
    directory.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        write_atomic(directory / WEIGHTS_FILE, weights)
    write_atomic(directory / META_FILE, (json.dumps(meta.to_dict(), indent=2) + "\n").encode())


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
    if meta.format == SAFETENSORS:
        return _load_weights(directory, meta, device)
    path = directory / meta.artifact_file
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    target = resolve_device(device)
    try:
        module = load_torchscript(path, target) if meta.format == TORCHSCRIPT else load_export(path, target)
    except ArchiveError as exc:
        raise ArtifactError(str(exc)) from None
    classifier = Classifier(module, meta, target)
    probe_module(classifier, path)
    return classifier


def probe_module(classifier: Classifier, path: Path, batch: int = 2) -> None:
    """One forward pass of an imported network on a fixed batch: finite [batch, classes] logits, twice the same
    (a module exported in training mode keeps its dropout on, and would label the same image differently)."""
    size = classifier.meta.input_size
    x = torch.linspace(-2, 2, batch * 3 * size * size).reshape(batch, 3, size, size).to(classifier.device)
    try:
        first, second = classifier.logits(x).float(), classifier.logits(x).float()
    except Exception as exc:  # whatever the program raises: it cannot serve this input
        raise ArtifactError(f"{path}: a forward pass on a [{batch}, 3, {size}, {size}] batch failed: "
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                            "(is the input size right? the model must take [N, 3, S, S] images)") from None
    want = (batch, len(classifier.classes))
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != want:
        got = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise ArtifactError(f"{path}: the model's output is {got} for a [{batch}, 3, {size}, {size}] batch; "
                            f"expected {list(want)}, one logit per class ({len(classifier.classes)} classes: "
                            f"{', '.join(classifier.classes)})")
    if not bool(torch.isfinite(first).all()):
        raise ArtifactError(f"{path}: the model's output contains NaN or Inf")
    if not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        raise ArtifactError(f"{path}: two forward passes on the same batch differ: save the model in eval mode "
                            "(model.eval() before torch.jit.script or torch.export.export)")


def _load_weights(directory: Path, meta: ModelMeta, device: str | torch.device) -> Classifier:
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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")  # unique per writer
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
