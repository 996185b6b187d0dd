"""Celery tasks: thin wrappers that unpack the message and call plain functions.

A classify worker also runs the lost-batch sweep (:mod:`worker.sweep`) in a daemon thread.

Flower loads this module too (it is the app's ``include``): what needs torch (the pipeline, serving,
retraining) is imported in the task bodies, by the worker that runs them, so `celery -A worker.app flower`
never loads torch (tests/test_cli_errors.py checks).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import redis
from celery import Task, signals
from celery.exceptions import Reject

from imgq.jobs import JobStore, split_rows
from imgq.settings import TRAIN_DEFAULTS
from worker import metrics
from worker.app import CLASSIFY_TASK, RETRAIN_TASK, _serves_classify, app, app_settings
from worker.sweep import Sweeper

# The bound of one retrain run (6 h), here rather than in model.retrain, which loads torch.
RETRAIN_TIME_LIMIT_S = 6 * 3600


@cache
def _store() -> JobStore:
    settings = app_settings()
    return JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)


@app.task(name=CLASSIFY_TASK)
def classify(job_id: str, batch_id: int, items: list[list[object]]) -> int:
    from worker.pipeline import classify_batch
    from worker.serving import get_serving

    pairs, kept = split_rows(items)  # [index, url] or [index, url, {kept columns}] (imgq.jobs.item_rows)
    try:
        with metrics.batch_in_flight():
            written = classify_batch(get_serving(app_settings()), _store(), job_id, batch_id, pairs, kept=kept)
        metrics.observe_item_latency(classify.request, written)
        return written
    except redis.RedisError as exc:
        # Results could not be written (Redis full, or gone): put the batch back rather than ack it
        # unwritten. The delivery counter still bounds how often it comes back.
        raise Reject(f"job {job_id} batch {batch_id}: Redis refused the write ({exc}); requeued", requeue=True) from exc


_sweepers: list[Sweeper] = []


@signals.worker_ready.connect
def _start_sweep(sender: Any = None, **_: Any) -> None:
    # Only workers that consume the classify queue sweep it; a trainer does not.
    if _serves_classify(sender):
        _sweepers.append(Sweeper(_store(), app, app_settings(), task=CLASSIFY_TASK).start())


@signals.worker_shutdown.connect
def _stop_sweep(**_: Any) -> None:
    for sweeper in _sweepers:
        sweeper.stop()


@cache
def _redis() -> redis.Redis:
    return _store().r


# Acked on receipt, not late: a retrain can outlast the visibility timeout, and a redelivered copy would
# train twice. A trainer that dies loses the run; its lease on the retrain lock lapses within IMGQ_LEASE,
# and the next trigger (or beat) starts a new one. The time limit only bounds a live run.
@app.task(name=RETRAIN_TASK, bind=True, acks_late=False, time_limit=RETRAIN_TIME_LIMIT_S)
def retrain(self: Task, source: str = TRAIN_DEFAULTS.source, arch: str = TRAIN_DEFAULTS.arch, epochs: int | None = None,
            init: str | None = None, seed: int = 0, input_size: int | None = TRAIN_DEFAULTS.input_size,
            augment: str = TRAIN_DEFAULTS.augment,
            trigger: str = "manual") -> dict[str, Any]:
    from model.retrain import RetrainRequest, run_retrain
    from worker.manifest import load_training_data

    request = RetrainRequest(source=source, arch=arch, epochs=epochs, init=init, seed=seed, input_size=input_size,
                             augment=augment, trigger=trigger)
    outcome = run_retrain(app_settings(), _redis(), str(self.request.id), request, load_data=load_training_data)
    metrics.count_retrain(outcome)
    return outcome
