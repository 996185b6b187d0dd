"""Model lifecycle from the command line: retrain (remote or local), follow progress, add a user's network,
list, promote, roll back."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import redis
from celery import Celery

from imgq.celery_app import RETRAIN_TASK
from imgq.errors import ImgqError
from imgq.settings import Settings, redacted_url
from model.champion import Champion, connect_optional
from model.checkpoint import ArtifactError, load_checkpoint
from model.classifier import Classifier
from model.data import load_imagefolder
from model.meta import Triple
from model.promotion import decide, measure
from model.registry import import_archive, list_versions, version_dir
from model.retrain import EventLog, RetrainRequest, events_key, train_and_gate
from model.train import EpochStats
from worker.manifest import load_training_data

# `imgq retrain --wait`: how long a run may wait for its `started` event before we look for a trainer (a
# trainer that is up takes a run within a second; one that is starting answers Celery's inspect by then).
START_WITHIN_S = 10.0


def trigger_retrain(app: Celery, settings: Settings, request: RetrainRequest) -> str:
    """Send a retrain to the train queue; returns the run id (its Celery task id)."""
    run_id = uuid.uuid4().hex
    app.send_task(RETRAIN_TASK, kwargs=dataclasses.asdict(request), queue=settings.train_queue, task_id=run_id)
    return run_id


def describe_epoch(e: EpochStats | dict[str, Any]) -> str:
    d = dataclasses.asdict(e) if isinstance(e, EpochStats) else e
    return (f"epoch {d['epoch']}: train loss {d['train_loss']:.4f} acc {d['train_accuracy']:.3f} | "
            f"val loss {d['val_loss']:.4f} acc {d['val_accuracy']:.3f} | {d['seconds']:.1f} s")


def describe_outcome(outcome: dict[str, Any]) -> str:
    if outcome["event"] != "done":
        return f"retrain {outcome['event']}: {outcome['reason']}"
    lines = [f"model {outcome['version']}: val accuracy {outcome['val_accuracy']:.4f}; "
             f"{'promoted to champion' if outcome['promoted'] else 'NOT promoted (candidate)'}: {outcome['reason']}",
             f"report: {outcome['report_dir']} (metrics.json, curves.png, confusion.png)"]
    if outcome.get("skipped_items"):
        lines.append(f"{len(outcome['skipped_items'])} training items could not be used:")
        lines += [f"  {item}" for item in outcome["skipped_items"]]
    return "\n".join(lines)


def trainer_consuming(app: Celery, queue: str, timeout_s: float = 1.0) -> bool:
    """Whether a live worker consumes ``queue`` (Celery's ``inspect active_queues``)."""
    replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    return any(q.get("name") == queue for queues in replies.values() for q in queues or [])


def no_trainer(queue: str, run_id: str) -> ImgqError:
    return ImgqError(f"no trainer is consuming queue {queue}: retrain {run_id} waits there and runs when one "
                     f"starts; start one with `imgq worker --queues {queue} --concurrency 1`")


def _wait_started(client: redis.Redis, run_id: str, consuming: Callable[[], bool], every_s: float) -> bool:
    """Until the run's first event (True); every ``every_s`` without one, False if no trainer consumes its
    queue (a busy trainer is a reason to go on waiting: the run is queued behind another one)."""
    key = events_key(run_id)
    deadline = time.monotonic() + every_s
    while not client.llen(key):
        if time.monotonic() > deadline:
            if not consuming():
                return False
            deadline = time.monotonic() + every_s
        time.sleep(0.3)
    return True


def follow_retrain(settings: Settings, run_id: str, out: TextIO = sys.stdout, timeout_s: float | None = None,
                   *, app: Celery | None = None, start_within_s: float = START_WITHIN_S) -> dict[str, Any]:
    """Print a run's progress until its final event (`failed`, "trainer died", if its trainer was killed).

    With ``app``: a run that has not started within ``start_within_s`` while no worker consumes the train
    queue ends with an :class:`ImgqError` that says how to start a trainer (instead of waiting forever)."""
    client = connect_optional(settings.redis_url)
    if client is None:
        raise ImgqError(f"cannot reach Redis at {redacted_url(settings.redis_url)}; start Redis there or point "
                        "IMGQ_REDIS_URL at a running one")
    try:
        if app is not None and not _wait_started(client, run_id, lambda: trainer_consuming(app, settings.train_queue),
                                                 start_within_s):
            raise no_trainer(settings.train_queue, run_id)
        for event in EventLog(client, run_id).follow(timeout_s=timeout_s):
            if event["event"] == "epoch":
                print(describe_epoch(event), file=out, flush=True)
            elif event["event"] == "previous_died":
                print(event["reason"], file=out, flush=True)
            elif event["event"] in ("done", "skipped", "failed"):
                print(describe_outcome(event), file=out, flush=True)
                return event
    finally:
        client.close()
    raise AssertionError("unreachable: follow() ends with a final event")


@contextmanager
def _champion(settings: Settings) -> Iterator[Champion]:
    """The champion pointer, in Redis too when a Redis answers (local commands work without one)."""
    client = connect_optional(settings.redis_url)
    try:
        yield Champion(settings.model_dir, client)
    finally:
        if client is not None:
            client.close()


def train_locally(settings: Settings, request: RetrainRequest, out: TextIO = sys.stdout) -> dict[str, Any]:
    """`imgq train`: the same train-and-gate as a retrain, in this process, no queue needed."""
    with _champion(settings) as champion:
        outcome = train_and_gate(settings, champion, request, load_data=load_training_data,
                                 on_epoch=lambda e: print(describe_epoch(e), file=out, flush=True))
    print(describe_outcome(outcome), file=out)
    return outcome


def list_models(settings: Settings) -> list[dict[str, Any]]:
    with _champion(settings) as pointer:
        champion = pointer.get()
    return [{"version": m.version, "arch": m.arch, "classes": list(m.classes),
             "val_accuracy": m.metrics.get("val_accuracy"), "created_at": m.created_at,
             "champion": m.version == champion} for m in list_versions(settings.model_dir)]


def print_models(models: list[dict[str, Any]], as_json: bool, out: TextIO = sys.stdout) -> None:
    if as_json:
        print(json.dumps(models, indent=2), file=out)
        return
    print(f"{'':2}{'version':<28} {'arch':<20} {'val acc':>8}  created", file=out)
    for m in models:
        acc = "" if m["val_accuracy"] is None else f"{m['val_accuracy']:.4f}"
        print(f"{'*' if m['champion'] else ' ':2}{m['version']:<28} {m['arch']:<20} {acc:>8}  {m['created_at']}",
              file=out)


def promote(settings: Settings, version: str) -> None:
    with _champion(settings) as champion:
        champion.set(version)


def rollback(settings: Settings) -> str:
    with _champion(settings) as champion:
        return champion.rollback()


@dataclasses.dataclass(frozen=True)
class AddOutcome:
    version: str
    promoted: bool
    reason: str
    accuracy: float | None  # on --data, when given


def add_model(settings: Settings, path: Path, *, classes: tuple[str, ...], input_size: int, mean: Triple,
              std: Triple, promote: bool, data: Path | None) -> AddOutcome:
    """`imgq models add`: register a TorchScript or torch.export archive as a version; promote it when asked.

    With ``data`` (an ImageFolder of labelled images) its accuracy there is recorded, and ``promote`` goes
    through the same gate as a trained model: the champion is re-measured on the same images and the new
    version wins only if it is at least as good (``IMGQ_PROMOTE_TOLERANCE``), by compare-and-set. Without
    ``data`` there is nothing to gate on, so ``promote`` is the hand override `imgq models promote` is, and
    the outcome says so.
    """
    folder = load_imagefolder(data) if data is not None else None
    if folder is not None and set(folder.classes) != set(classes):
        raise ImgqError(f"{data}: its classes ({', '.join(folder.classes)}) differ from --classes "
                        f"({', '.join(classes)}); name the model's classes, in its output order")
    accuracy: float | None = None

    def assess(candidate: Classifier) -> dict[str, Any]:
        nonlocal accuracy
        if folder is None:
            return {}
        accuracy = measure(candidate, folder.items, folder.classes)
        return {"val_accuracy": accuracy, "val_data": str(data), "val_images": len(folder.items)}

    version = import_archive(settings.model_dir, path, classes=classes, input_size=input_size, mean=mean, std=std,
                             assess=assess)
    if not promote:
        return AddOutcome(version, False, f"registered as a candidate; promote it with `imgq models promote "
                                          f"{version}`", accuracy)
    with _champion(settings) as champion:
        if folder is None or accuracy is None:
            champion.set(version)
            return AddOutcome(version, True, "promoted without a gate (no --data to measure it on): the same "
                                             "override as `imgq models promote`", None)
        compared = champion.get()
        decision = decide(accuracy, _load_champion(settings, compared), folder.items, folder.classes,
                          tolerance=settings.promote_tolerance)
        promoted, reason = decision.promote, decision.reason.replace("validation accuracy", f"accuracy on {data}")
        if promoted:
            promoted, now = champion.promote_if(version, expected=compared)
            if not promoted:
                reason = (f"the champion changed during gating ({compared or 'none'} -> {now or 'none'}); kept as "
                          f"a candidate (the gate said: {decision.reason})")
    return AddOutcome(version, promoted, reason, accuracy)


def _load_champion(settings: Settings, version: str | None) -> Classifier | None:
    if version is None:
        return None
    try:
        return load_checkpoint(version_dir(settings.model_dir, version))
    except (ArtifactError, OSError):  # a champion that cannot load is no bar to clear (as a retrain's gate)
        return None
