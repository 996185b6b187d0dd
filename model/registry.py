"""A versioned model registry on disk, and which version is the champion that workers serve.

    MODEL_DIR/versions/<version>/weights.safetensors   immutable once renamed into place (imgq's networks)
    MODEL_DIR/versions/<version>/model.ts | model.pt2   or a user's network (`imgq models add`: import_archive)
    MODEL_DIR/versions/<version>/meta.json             format, classes, input size, normalisation, metrics
    MODEL_DIR/CHAMPION                                  the champion's version id, replaced atomically
    MODEL_DIR/CHAMPION_HISTORY                          promoted versions, one a line, oldest first
    MODEL_DIR/CHAMPION.lock                             flock: one writer of the two files above at a time

A version directory is written under a temporary name and renamed, so a reader sees all of it or none.
The champion files are changed only through :class:`model.champion.Champion` (with or without Redis),
always under the lock: a reader holding it sees a pointer and history that agree.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgq.errors import ImgqError, ModelNotFoundError
from model.archive import ArchiveError, detect_format
from model.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    Classifier,
    load_checkpoint,
    read_meta,
    serialize_weights,
    write_atomic,
    write_checkpoint,
)
from model.meta import ARTIFACT_FILES, VERSION_PATTERN, ModelMeta, Triple, new_version_id
from model.net import ModelConfig
from model.pointer import CHAMPION_FILE, TRAIN_HINT, champion_version

VERSIONS_DIR = "versions"
_TRAIN_HINT = TRAIN_HINT


def version_dir(model_dir: Path, version: str) -> Path:
    return model_dir / VERSIONS_DIR / version


def publish(
    model_dir: Path,
    model: nn.Module,
    *,
    config: ModelConfig,
    classes: Sequence[str],
    mean: Triple,
    std: Triple,
    metrics: dict[str, Any],
    extra_files: Callable[[str], Mapping[str, bytes]] | None = None,
) -> str:
    """Store ``model`` as a new version and return its id. Does not change the champion.

    ``extra_files(version)`` gives more files (the training report) to store in the version directory,
    written before it is renamed into place so the version is complete the moment it appears.
    """
    weights = serialize_weights(model)
    now = datetime.now(UTC)
    version = new_version_id(hashlib.sha256(weights).hexdigest(), now)
    meta = ModelMeta(version=version, config=config, classes=tuple(classes), mean=mean, std=std,
                     metrics=metrics, created_at=now.isoformat())
    final = version_dir(model_dir, version)
    tmp = final.with_name(f".tmp-{version}-{secrets.token_hex(4)}")
    try:
        write_checkpoint(weights, meta, tmp)
        for name, data in (extra_files(version) if extra_files else {}).items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, final)
        except OSError:
            # Same second and same weights digest: byte-identical weights are already published.
            if not (final / WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version


def import_archive(
    model_dir: Path,
    source: Path,
    *,
    classes: Sequence[str],
    input_size: int,
    mean: Triple,
    std: Triple,
    metrics: dict[str, Any] | None = None,
    assess: Callable[[Classifier], Mapping[str, Any]] | None = None,
) -> str:
    """Store a user's TorchScript or torch.export archive as a new version and return its id (the champion
    does not change). It is loaded and probed (:func:`model.checkpoint.load_checkpoint`) before it appears:
    a file that is not such an archive, or whose output is not [N, len(classes)], is refused with
    ``ArtifactError`` and nothing is published. ``assess(loaded)`` gives more metrics (an accuracy), stored
    in meta.json before the version appears."""
    try:
        fmt = detect_format(source)
    except ArchiveError as exc:
        raise ArtifactError(str(exc)) from None
    data = source.read_bytes()
    now = datetime.now(UTC)
    version = new_version_id(hashlib.sha256(data).hexdigest(), now)

    def meta_with(extra: Mapping[str, Any]) -> ModelMeta:
        return ModelMeta(version=version, config=None, classes=tuple(classes), mean=mean, std=std,
                         metrics={**(metrics or {}), "source": str(source), **extra}, created_at=now.isoformat(),
                         format=fmt, input_size=input_size)

    try:
        meta = meta_with({})
    except ValueError as exc:
        raise ArtifactError(f"{source}: {exc}") from None
    final = version_dir(model_dir, version)
    tmp = final.with_name(f".tmp-{version}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
        write_atomic(tmp / ARTIFACT_FILES[fmt], data)
        write_checkpoint(None, meta, tmp)
        try:
            loaded = load_checkpoint(tmp, "cpu")  # refused here, before it is a version anyone can promote
        except ArtifactError as exc:  # name the user's file, not the temporary copy
            raise ArtifactError(str(exc).replace(str(tmp / ARTIFACT_FILES[fmt]), str(source))) from None
        if assess is not None:
            write_checkpoint(None, meta_with(assess(loaded)), tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Same second and same bytes: this very archive is already published under this id.
            if not (final / ARTIFACT_FILES[fmt]).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version


def list_versions(model_dir: Path) -> list[ModelMeta]:
    """Every published version, oldest first."""
    root = model_dir / VERSIONS_DIR
    if not root.is_dir():
        return []
    # Temporary directories start with "." and never match the pattern.
    metas = [read_meta(p) for p in root.iterdir() if VERSION_PATTERN.match(p.name)]
    # created_at has microseconds; version ids alone only order to the second.
    return sorted(metas, key=lambda m: (m.created_at, m.version))


def require_published(model_dir: Path, version: str) -> None:
    """``ImgqError`` listing the versions there are, unless ``version`` is published in ``model_dir``."""
    if not VERSION_PATTERN.match(version) or not (version_dir(model_dir, version) / META_FILE).is_file():
        known = [m.version for m in list_versions(model_dir)]
        raise ImgqError(f"no model version {version!r} in {model_dir}; "
                        f"available: {', '.join(known) if known else 'none (' + _TRAIN_HINT + ')'}")


def load_champion(model_dir: Path, device: str | torch.device = "cpu") -> Classifier:
    """The champion, validated and ready; ``ModelNotFoundError`` if there is none."""
    version = champion_version(model_dir)
    if version is None:
        count = len(list_versions(model_dir))
        extra = f" ({count} unpromoted versions exist)" if count else ""
        raise ModelNotFoundError(f"no champion model in {model_dir}{extra}: {_TRAIN_HINT}")
    directory = version_dir(model_dir, version)
    if not VERSION_PATTERN.match(version) or not directory.is_dir():
        raise ModelNotFoundError(f"{model_dir / CHAMPION_FILE} names version {version!r}, "
                                 f"which is not in {model_dir / VERSIONS_DIR}: {_TRAIN_HINT}")
    return load_checkpoint(directory, device)
