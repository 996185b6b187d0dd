"""The champion pointer on disk, read and written without torch: the supervisor, `imgq status` and the
worker's start-up check read it before (or without) loading any model.

    MODEL_DIR/CHAMPION          the champion's version id, replaced atomically
    MODEL_DIR/CHAMPION_HISTORY  one promoted version a line, oldest first (rollback goes back one)
    MODEL_DIR/CHAMPION.lock     flock: one writer of the two files above at a time

Promotion itself goes through :class:`model.champion.Champion` (Redis is its source of truth when it answers).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgq.errors import ModelNotFoundError

CHAMPION_FILE = "CHAMPION"
HISTORY_FILE = "CHAMPION_HISTORY"
LOCK_FILE = "CHAMPION.lock"  # not a dot-file: those are temporaries, never left behind
TRAIN_HINT = "train one first: imgq train --data demo"


def champion_version(model_dir: Path) -> str | None:
    try:
        version = (model_dir / CHAMPION_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return version or None


def require_champion(model_dir: Path, where: str = "") -> str:
    """The champion's version, or the one "no model" error every role shows (``where`` names the setting)."""
    version = champion_version(model_dir)
    if version is None:
        raise ModelNotFoundError(f"no model in {model_dir}{f' ({where})' if where else ''}; {TRAIN_HINT}")
    return version


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
