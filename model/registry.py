"""A versioned model registry on disk, and which version is the champion that workers serve.

    MODEL_DIR/versions/<version>/weights.safetensors   immutable once renamed into place
    MODEL_DIR/versions/<version>/meta.json
    MODEL_DIR/CHAMPION                                  the champion's version id, replaced atomically
    MODEL_DIR/CHAMPION_HISTORY                          promoted versions, one a line, oldest first
    MODEL_DIR/CHAMPION.lock                             flock: one writer of the two files above at a time

A version directory is written under a temporary name and renamed, so a reader sees all of it or none.
The champion files are changed only through :class:`imgq.champion.Champion` (``set_champion`` here is
its no-Redis path), always under the lock: a reader holding it sees a pointer and history that agree.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgq.errors import ImgqError, ModelNotFoundError
from model.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    Classifier,
    load_checkpoint,
    read_meta,
    serialize_weights,
    write_checkpoint,
)
from model.meta import VERSION_PATTERN, ModelMeta, Triple, new_version_id
from model.net import ModelConfig

VERSIONS_DIR = "versions"
CHAMPION_FILE = "CHAMPION"
HISTORY_FILE = "CHAMPION_HISTORY"
LOCK_FILE = "CHAMPION.lock"  # not a dot-file: those are temporaries, never left behind
_TRAIN_HINT = "run `imgq train --data demo` to train one"


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


def list_versions(model_dir: Path) -> list[ModelMeta]:
    """Every published version, oldest first."""
    root = model_dir / VERSIONS_DIR
    if not root.is_dir():
        return []
    # Temporary directories start with "." and never match the pattern.
    metas = [read_meta(p) for p in root.iterdir() if VERSION_PATTERN.match(p.name)]
    # created_at has microseconds; version ids alone only order to the second.
    return sorted(metas, key=lambda m: (m.created_at, m.version))


def champion_version(model_dir: Path) -> str | None:
    try:
        version = (model_dir / CHAMPION_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return version or None


def set_champion(model_dir: Path, version: str) -> None:
    """Promote ``version`` in ``model_dir`` alone (no Redis); raises ``ImgqError`` if it was never published.

    The same locked path as ``Champion(model_dir).set(version)``: there is one way to promote.
    """
    from imgq.champion import Champion  # imgq.champion builds on this module

    Champion(model_dir).set(version)


def require_published(model_dir: Path, version: str) -> None:
    """``ImgqError`` listing the versions there are, unless ``version`` is published in ``model_dir``."""
    if not VERSION_PATTERN.match(version) or not (version_dir(model_dir, version) / META_FILE).is_file():
        known = [m.version for m in list_versions(model_dir)]
        raise ImgqError(f"no model version {version!r} in {model_dir}; "
                        f"available: {', '.join(known) if known else 'none (' + _TRAIN_HINT + ')'}")


@dataclass(frozen=True)
class ChampionState:
    """The champion and the promotions that led to it; ``history[-1] == pointer`` whenever both exist."""

    pointer: str | None
    history: tuple[str, ...]


@contextmanager
def champion_lock(model_dir: Path) -> Iterator[None]:
    """Hold ``MODEL_DIR/CHAMPION.lock`` exclusively: one reader-and-writer of the champion files at a time."""
    model_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_champion_state(model_dir: Path) -> ChampionState:
    """The pointer and history on disk (hold ``champion_lock`` so the two agree)."""
    pointer = champion_version(model_dir)
    try:
        text = (model_dir / HISTORY_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""  # a registry from before the history file: the history is the current champion
    history = tuple(line.strip() for line in text.splitlines() if line.strip())
    if pointer is not None and history[-1:] != (pointer,):
        history = (*history, pointer)
    return ChampionState(pointer, history)


def write_champion_state(model_dir: Path, state: ChampionState) -> None:
    """Replace both files, history first (readers follow the pointer); the caller holds ``champion_lock``."""
    if state.pointer is None:
        return
    _replace(model_dir / HISTORY_FILE, "".join(v + "\n" for v in state.history))
    _replace(model_dir / CHAMPION_FILE, state.pointer + "\n")


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
