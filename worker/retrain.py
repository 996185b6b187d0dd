"""One retrain: lock, load data, train, gate, promote. A plain function under the `imgq.retrain` task.

Progress goes to a Redis list per run (`imgq:retrain:<run>:events`, JSON events) that
`imgq retrain --wait` follows: one `epoch` event per epoch, then one final `done`, `skipped` or `failed`.
Only one retrain runs at a time across the deployment (a Redis lock); a second trigger is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from imgq.champion import Champion
from imgq.errors import ImgqError, ModelNotFoundError
from imgq.settings import Settings
from model.checkpoint import ArtifactError, load_checkpoint
from model.classifier import Classifier
from model.promotion import decide
from model.registry import version_dir
from model.train import EpochStats, TrainConfig, train
from worker.manifest import load_training_data

log = logging.getLogger(__name__)

LOCK_KEY = "imgq:retrain:lock"
# Longer than any sane retrain; the lock is released on completion, this only bounds a crashed trainer.
LOCK_TIMEOUT_S = 6 * 3600
EVENTS_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class RetrainRequest:
    source: str = "demo"
    arch: str = "cnn"
    epochs: int | None = None
    init: str | None = None
    seed: int = 0
    # 64 keeps CPU training to minutes for every architecture; torchvision models adapt their pooling.
    input_size: int = 64
    trigger: str = "manual"  # manual | beat


def events_key(run_id: str) -> str:
    return f"imgq:retrain:{run_id}:events"


class EventLog:
    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.r = client
        self.key = events_key(run_id)

    def emit(self, kind: str, **fields: Any) -> None:
        with self.r.pipeline() as p:
            p.rpush(self.key, json.dumps({"event": kind, "at": time.time(), **fields}))
            p.expire(self.key, EVENTS_TTL_S)
            p.execute()

    def follow(self, timeout_s: float | None = None, poll_s: float = 0.3) -> Iterator[dict[str, Any]]:
        """Yield events until the final one."""
        seen, start = 0, time.monotonic()
        while True:
            for raw in self.r.lrange(self.key, seen, -1):
                seen += 1
                event: dict[str, Any] = json.loads(raw)
                yield event
                if event["event"] in ("done", "skipped", "failed"):
                    return
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise ImgqError(f"retrain not finished after {timeout_s:g} s")
            time.sleep(poll_s)


def run_retrain(settings: Settings, client: redis.Redis, run_id: str, request: RetrainRequest) -> dict[str, Any]:
    """Returns the final event. Never raises for a failed training: the failure is the outcome."""
    events = EventLog(client, run_id)
    lock = client.lock(LOCK_KEY, timeout=LOCK_TIMEOUT_S, blocking=False)
    if not lock.acquire():
        holder = client.get(f"{LOCK_KEY}:run")
        why = f"another retrain is running ({bytes(holder).decode() if holder else 'unknown run'}); skipped"  # type: ignore[arg-type]
        log.warning("retrain %s (%s): %s", run_id, request.trigger, why)
        events.emit("skipped", reason=why)
        return {"event": "skipped", "reason": why}
    try:
        client.set(f"{LOCK_KEY}:run", run_id, ex=LOCK_TIMEOUT_S)
        events.emit("started", request=dataclasses.asdict(request))
        outcome = train_and_gate(settings, Champion(settings.model_dir, client), request,
                                 on_epoch=lambda stats: events.emit("epoch", **dataclasses.asdict(stats)))
        events.emit("done", **{k: v for k, v in outcome.items() if k != "event"})
    except Exception as exc:  # the run's outcome, reported to whoever waits
        log.exception("retrain %s failed", run_id)
        outcome = {"event": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        events.emit("failed", reason=outcome["reason"])
    finally:
        client.delete(f"{LOCK_KEY}:run")
        lock.release()
    return outcome


def train_and_gate(settings: Settings, champion: Champion, request: RetrainRequest,
                   on_epoch: Callable[[EpochStats], None] | None = None) -> dict[str, Any]:
    """Train a candidate, re-measure the champion on its held-out set, promote if it is at least as good."""
    data = load_training_data(request.source, settings)
    config = TrainConfig(source=request.source, arch=request.arch, seed=request.seed, init=request.init,
                         epochs=request.epochs or settings.retrain_epochs, input_size=request.input_size)
    result = train(config, settings.model_dir, on_epoch=on_epoch, promote=False, data=data)
    decision = decide(result.val_accuracy, _current(champion, settings), result.val_items, result.classes,
                      tolerance=settings.promote_tolerance)
    if decision.promote:
        champion.set(result.version)
    log.info("retrain: %s %s (%s)", result.version, "promoted" if decision.promote else "held back",
             decision.reason)
    return {"event": "done", "version": result.version, "promoted": decision.promote,
            "reason": decision.reason, "val_accuracy": result.val_accuracy,
            "champion_accuracy": decision.champion_accuracy, "skipped_items": result.skipped,
            "report_dir": str(version_dir(settings.model_dir, result.version))}


def _current(champion: Champion, settings: Settings) -> Classifier | None:
    version = champion.get()
    if version is None:
        return None
    try:
        return load_checkpoint(version_dir(settings.model_dir, version))
    except (ArtifactError, ModelNotFoundError, OSError) as exc:
        log.warning("champion %s cannot be loaded (%s): the candidate is compared with nothing", version, exc)
        return None
