"""One retrain: lease the lock, load data, train, gate, promote. A plain function under the `imgq.retrain` task.

Progress goes to a Redis list per run (`imgq:retrain:<run>:events`, JSON events) that
`imgq retrain --wait` follows: `started`, one `epoch` event per epoch, then exactly one final `done`,
`skipped` or `failed` (the first final wins: `imgq:retrain:<run>:final` records it).

Only one retrain runs at a time across the deployment. The lock is a lease, not a long timeout:

    imgq:retrain:lock       the holder's run id, TTL IMGQ_LEASE; a daemon thread of the live trainer renews
                            it every lease/3, so a SIGKILLed trainer frees it within one lease
    imgq:retrain:last_run   the run that took the lock last (kept as long as the events); never blocks

A trigger that finds the lock held is skipped. A run that takes the lock and finds the last run without a
final event (its trainer stopped renewing the lease) marks that run `failed` ("trainer died") and says so
in its own events; a follower of a run whose lease lapsed without a final event marks it the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from imgq import keys
from imgq.errors import ImgqError, ModelNotFoundError
from imgq.settings import TRAIN_DEFAULTS, Settings
from model.champion import Champion
from model.checkpoint import ArtifactError, load_checkpoint
from model.classifier import Classifier
from model.data import LabeledImages
from model.promotion import decide
from model.registry import version_dir
from model.train import EpochStats, TrainConfig, train

log = logging.getLogger(__name__)

# Where training data comes from: `demo`, an ImageFolder, or a manifest whose images are fetched like any
# classified URL (worker.manifest.load_training_data, which the trainer task and `imgq train` pass in).
LoadData = Callable[[str, Settings], LabeledImages]

LOCK_KEY = keys.RETRAIN_LOCK
LAST_RUN_KEY = keys.RETRAIN_LAST_RUN
EVENTS_TTL_S = 7 * 24 * 3600
FINAL_EVENTS = ("done", "skipped", "failed")
DIED = "died"  # the final marker of a run declared dead (its event is a `failed`)

# Take the lease; on success also record the run as the last one and log its `started` event, in one step
# (a trainer killed right after taking the lock still leaves a run that can be declared dead).
# KEYS: lock, last_run, events of this run. ARGV: run id, lease ms, TTL of the record s, started event.
# Returns {1, previous last run or ""} or {0, the holder's run id}.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local previous = redis.call('GET', KEYS[2]) or ''
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
  redis.call('RPUSH', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  return {1, previous}
end
return {0, redis.call('GET', KEYS[1]) or ''}
"""
# KEYS: lock. ARGV: run id, lease ms. Renew only our own lease; 0 when it lapsed or another run holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: final marker, events. ARGV: marker value, event, TTL s. Appends the final event only if the run has
# none yet. Returns the run's final marker (ours, or the one that was there).
_FINISH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return ARGV[1]
end
return redis.call('GET', KEYS[1])
"""


@dataclass(frozen=True)
class RetrainRequest:
    source: str = TRAIN_DEFAULTS.source
    arch: str = TRAIN_DEFAULTS.arch
    epochs: int | None = None
    init: str | None = None
    seed: int = 0
    # 64 keeps CPU training to minutes for every architecture; torchvision models adapt their pooling.
    input_size: int | None = TRAIN_DEFAULTS.input_size
    augment: str = TRAIN_DEFAULTS.augment
    trigger: str = "manual"  # manual | beat


def events_key(run_id: str) -> str:
    return keys.retrain_events(run_id)


def final_key(run_id: str) -> str:
    return keys.retrain_final(run_id)


def _event(kind: str, **fields: Any) -> str:
    return json.dumps({"event": kind, "at": time.time(), **fields})


def _text(raw: object) -> str:
    return bytes(raw).decode() if isinstance(raw, bytes) else str(raw)


class EventLog:
    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.r = client
        self.run_id = run_id
        self.key = events_key(run_id)

    def emit(self, kind: str, **fields: Any) -> None:
        if kind in FINAL_EVENTS:
            self.finish(kind, **fields)
            return
        with self.r.pipeline() as p:
            p.rpush(self.key, _event(kind, **fields))
            p.expire(self.key, EVENTS_TTL_S)
            p.execute()

    def finish(self, kind: str, **fields: Any) -> str:
        """Log the run's final event unless it has one already; returns its final marker."""
        final = self._finish(kind, kind, fields)
        if final != kind:
            log.warning("retrain %s: %s not logged, the run had already ended (%s)", self.run_id, kind, final)
        return final

    def declare_dead(self) -> str:
        """Mark the run `failed` because its trainer stopped renewing the lease, unless it already ended.

        Returns the run's final marker: ``DIED`` if it is (now or already) declared dead.
        """
        reason = (f"trainer died: run {self.run_id} stopped renewing the retrain lease without a final event "
                  "(its trainer was killed or lost Redis)")
        return self._finish("failed", DIED, {"reason": reason, "died": True})

    def _finish(self, kind: str, marker: str, fields: dict[str, Any]) -> str:
        return _text(self.r.eval(_FINISH, 2, final_key(self.run_id), self.key, marker, _event(kind, **fields),
                                 EVENTS_TTL_S))

    def follow(self, timeout_s: float | None = None, poll_s: float = 0.3) -> Iterator[dict[str, Any]]:
        """Yield events until the final one; a run whose lease lapsed without one ends `failed` (trainer died)."""
        seen, start = 0, time.monotonic()
        while True:
            new = self.r.lrange(self.key, seen, -1)
            for raw in new:
                seen += 1
                event: dict[str, Any] = json.loads(raw)
                yield event
                if event["event"] in FINAL_EVENTS:
                    return
            # Started (a trainer took the lease: `started` is logged with it), no final, and the lease is no
            # longer this run's: its trainer died. A run that ends logs its final before releasing the lease,
            # and declare_dead() logs nothing once a final exists, so a finishing run is never declared dead.
            if not new and seen and _text(self.r.get(LOCK_KEY) or b"") != self.run_id:
                self.declare_dead()  # the next read yields the final event, this one or the run's own
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise ImgqError(f"retrain not finished after {timeout_s:g} s")
            time.sleep(poll_s)


class Lease:
    """The retrain lock as a lease held by one run and renewed by a daemon thread while the run goes on."""

    def __init__(self, client: redis.Redis, run_id: str, lease_s: float) -> None:
        self.r = client
        self.run_id = run_id
        self.lease_ms = max(1, int(lease_s * 1000))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"retrain-lease-{run_id[:8]}", daemon=True)

    def acquire(self, started: str) -> tuple[bool, str]:
        """(True, the previous last run or "") or (False, the holder's run id)."""
        ok, other = self.r.eval(_ACQUIRE, 3, LOCK_KEY, LAST_RUN_KEY, events_key(self.run_id), self.run_id,
                                self.lease_ms, EVENTS_TTL_S, started)
        if ok:
            self._thread.start()
        return bool(ok), _text(other)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.r.eval(_RELEASE, 1, LOCK_KEY, self.run_id)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_ms / 3000):
            try:
                renewed = self.r.eval(_RENEW, 1, LOCK_KEY, self.run_id, self.lease_ms)
            except redis.RedisError as exc:  # Redis away for a moment: the lease may still be ours
                log.warning("retrain %s: cannot renew the lease (%s); retrying", self.run_id, exc)
                continue
            if not renewed:
                log.error("retrain %s: the lease lapsed (this trainer stalled past IMGQ_LEASE); another retrain "
                          "may start and this run is reported as dead", self.run_id)
                return


def run_retrain(settings: Settings, client: redis.Redis, run_id: str, request: RetrainRequest, *,
                load_data: LoadData) -> dict[str, Any]:
    """Returns the final event. Never raises for a failed training: the failure is the outcome."""
    events = EventLog(client, run_id)
    lease = Lease(client, run_id, settings.lease_s)
    acquired, other = lease.acquire(_event("started", request=dataclasses.asdict(request)))
    if not acquired:
        why = f"another retrain is running ({other or 'unknown run'}); skipped"
        log.warning("retrain %s (%s): %s", run_id, request.trigger, why)
        events.finish("skipped", reason=why)
        return {"event": "skipped", "reason": why}
    try:
        if other and other != run_id and EventLog(client, other).declare_dead() == DIED:
            log.warning("retrain %s: previous run %s died (its trainer stopped renewing the lease)", run_id, other)
            events.emit("previous_died", run=other,
                        reason=f"previous run {other} died (its trainer stopped renewing the retrain lease); "
                               "marked failed")
        outcome = train_and_gate(settings, Champion(settings.model_dir, client), request, load_data=load_data,
                                 on_epoch=lambda stats: events.emit("epoch", **dataclasses.asdict(stats)))
        events.finish("done", **{k: v for k, v in outcome.items() if k != "event"})
    except Exception as exc:  # the run's outcome, reported to whoever waits
        log.exception("retrain %s failed", run_id)
        outcome = {"event": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        events.finish("failed", reason=outcome["reason"])
    finally:
        lease.release()  # after the final event: a follower never sees a free lease before it
    return outcome


def train_and_gate(settings: Settings, champion: Champion, request: RetrainRequest, *, load_data: LoadData,
                   on_epoch: Callable[[EpochStats], None] | None = None) -> dict[str, Any]:
    """Train a candidate, re-measure the champion on its held-out set, promote if it is at least as good.

    The promotion is a compare-and-set against the champion the candidate was measured against: if the
    champion changed meanwhile (a promotion or rollback by hand, another trainer), the candidate is held back.
    """
    data = load_data(request.source, settings)
    config = TrainConfig(source=request.source, arch=request.arch, seed=request.seed, init=request.init,
                         epochs=request.epochs or settings.retrain_epochs or None, input_size=request.input_size,
                         augment=request.augment)
    result = train(config, settings.model_dir, on_epoch=on_epoch, promote=False, data=data)
    compared = champion.get()
    decision = decide(result.val_accuracy, _load(compared, settings), result.val_items, result.classes,
                      tolerance=settings.promote_tolerance)
    promoted, reason = decision.promote, decision.reason
    if decision.promote:
        promoted, now = champion.promote_if(result.version, expected=compared)
        if not promoted:
            reason = (f"the champion changed during gating ({compared or 'none'} -> {now or 'none'}); kept as a "
                      f"candidate, promote it by hand if intended (the gate said: {decision.reason})")
    log.info("retrain: %s %s (%s)", result.version, "promoted" if promoted else "held back", reason)
    return {"event": "done", "version": result.version, "promoted": promoted,
            "reason": reason, "val_accuracy": result.val_accuracy,
            "champion_accuracy": decision.champion_accuracy, "skipped_items": result.skipped,
            "report_dir": str(version_dir(settings.model_dir, result.version))}


def _load(version: str | None, settings: Settings) -> Classifier | None:
    if version is None:
        return None
    try:
        return load_checkpoint(version_dir(settings.model_dir, version))
    except (ArtifactError, ModelNotFoundError, OSError) as exc:
        log.warning("champion %s cannot be loaded (%s): the candidate is compared with nothing", version, exc)
        return None
