"""Hot reload: follow the champion pointer and swap models between batches, without a restart.

A batch reads ``current()`` once and keeps that object, so it never mixes versions. A new champion whose
artifact is refused (truncated, mis-shaped, NaNs, not safetensors) is logged and skipped; the model
already loaded keeps serving. A new model is warmed up (``warm_up``: its first forward passes allocate and
pick kernels) before any batch sees it, so the first batch after a reload does not pay for that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
import torch

from imgq.errors import ImgqError, ModelNotFoundError
from model.champion import Champion
from model.checkpoint import load_checkpoint
from model.classifier import Classifier
from model.pointer import TRAIN_HINT
from model.registry import version_dir
from worker import metrics

log = logging.getLogger(__name__)


class ModelWatcher:
    def __init__(self, champion: Champion, device: torch.device, *, check_every_s: float,
                 warm_up: Callable[[Classifier], None] | None = None) -> None:
        self.champion = champion
        self.device = device
        self.check_every_s = check_every_s
        self._warm_up = warm_up
        self.refused: dict[str, str] = {}  # version -> why; not retried
        self._lock = threading.Lock()
        version = champion.get()
        if version is None:
            raise ModelNotFoundError(f"no champion model in {champion.model_dir}; {TRAIN_HINT}")
        self._model = load_checkpoint(version_dir(champion.model_dir, version), device)
        self._next_check = time.monotonic() + check_every_s

    def current(self) -> Classifier:
        if time.monotonic() >= self._next_check and self._lock.acquire(blocking=False):
            # One thread checks (and loads); the others keep serving the model they have.
            try:
                self._next_check = time.monotonic() + self.check_every_s
                self._maybe_reload()
            finally:
                self._lock.release()
        return self._model

    def _maybe_reload(self) -> None:
        try:
            version = self.champion.get()
        except redis.RedisError as exc:
            log.warning("cannot read the champion pointer (%s); serving %s", exc, self._model.version)
            return
        if version is None or version == self._model.version or version in self.refused:
            return
        try:
            model = load_checkpoint(version_dir(self.champion.model_dir, version), self.device)
            if self._warm_up is not None:
                self._warm_up(model)
        except (ImgqError, OSError, RuntimeError) as exc:  # RuntimeError: torch's, from the warm-up's forward
            self.refused[version] = str(exc)
            metrics.count_model_load_failure()
            log.error("refused model %s: %s; still serving %s", version, exc, self._model.version)
            return
        log.info("hot reload: %s -> %s", self._model.version, version)
        self._model = model
