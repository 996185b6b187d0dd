"""Which model version is the champion: a pointer in Redis, mirrored on disk, with a history for rollback.

    Redis  imgq:champion                 version id that workers serve (checked between batches)
    disk   MODEL_DIR/CHAMPION            the same id (model.registry), so `imgq run` and a fresh Redis agree
    disk   MODEL_DIR/CHAMPION_HISTORY    one promoted version a line, oldest first: `rollback` pops the last

Writes go to disk first, then Redis. A Redis without the key (new, or flushed) is seeded from disk.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import redis

from imgq.errors import ImgqError
from model import registry

CHAMPION_KEY = "imgq:champion"
HISTORY_FILE = "CHAMPION_HISTORY"

log = logging.getLogger(__name__)


class Champion:
    def __init__(self, model_dir: Path, client: redis.Redis | None = None) -> None:
        self.model_dir = model_dir
        self.r = client

    def get(self) -> str | None:
        if self.r is not None:
            raw = self.r.get(CHAMPION_KEY)
            if raw is not None:
                return bytes(raw).decode()  # type: ignore[arg-type]
        version = registry.champion_version(self.model_dir)
        if version is not None and self.r is not None:
            self.r.set(CHAMPION_KEY, version, nx=True)
        return version

    def set(self, version: str) -> None:
        """Promote ``version`` (it must be published); records it in the history."""
        history = self.history()  # before the pointer moves: without a file, history is the current champion
        registry.set_champion(self.model_dir, version)
        if not history or history[-1] != version:
            self._write_history([*history, version])
        if self.r is not None:
            self.r.set(CHAMPION_KEY, version)

    def rollback(self) -> str:
        """Back to the champion before the current one; returns it."""
        history = self.history()
        current = self.get()
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise ImgqError(f"no earlier champion to roll back to in {self.model_dir / HISTORY_FILE}")
        previous = history[-1]
        registry.set_champion(self.model_dir, previous)
        self._write_history(history)
        if self.r is not None:
            self.r.set(CHAMPION_KEY, previous)
        return previous

    def history(self) -> list[str]:
        try:
            text = (self.model_dir / HISTORY_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            current = registry.champion_version(self.model_dir)
            return [current] if current else []
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _write_history(self, versions: list[str]) -> None:
        path = self.model_dir / HISTORY_FILE
        tmp = path.with_name(f".{HISTORY_FILE}.tmp-{secrets.token_hex(4)}")
        tmp.write_text("".join(v + "\n" for v in versions), encoding="utf-8")
        os.replace(tmp, path)


def connect_optional(url: str) -> redis.Redis | None:
    """A Redis client if one answers quickly, else None (local `imgq train` works without Redis)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        log.info("no Redis at %s: champion pointer written on disk only", url)
        client.close()
        return None
    return client
