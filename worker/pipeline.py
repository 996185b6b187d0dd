"""One batch of (index, URL) pairs through claim -> fetch -> decode -> infer -> write back.

A plain function, called by the Celery task and directly by tests. Every item of the batch ends with exactly
one result record: a bad item never fails its batch, and a failure of the batch itself (the model raising,
a bug in any stage) ends its unwritten items as ``internal`` rather than dropping them. Only a Redis error
escapes (the task then puts the batch back). The batch's lease (:mod:`worker.lease`) decides whether this
delivery counts and is renewed while it runs; the batch's time is bounded by ``IMGQ_TASK_TIME_LIMIT`` (fetches
past it end as ``timeout``), so a live worker finishes well inside the visibility timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import torch

from imgq.errors import ErrorCode, ItemError
from imgq.jobs import JobNotFoundError, JobStore, Kept, result_record
from worker import metrics
from worker.lease import Lease, claim, keeper, wait_bound_s
from worker.serving import Serving

log = logging.getLogger(__name__)

# An exception's text in an item's message is cut to this many characters.
_MESSAGE_MAX = 500

_lost_jobs: set[str] = set()
_lost_lock = threading.Lock()


def classify_batch(engine: Serving, store: JobStore, job_id: str, batch_id: int,
                   items: Sequence[tuple[int, str]], *, kept: Mapping[int, Kept] | None = None) -> int:
    """Returns how many results this call wrote (0 for a copy of a batch that was already done). ``kept``: the
    input's kept columns by index, merged into each item's record, an error's too."""
    settings = engine.settings
    lease = Lease(job_id, batch_id)
    got = claim(store, lease, [i for i, _ in items], lease_s=settings.lease_s,
                wait_s=wait_bound_s(settings.task_time_limit_s, settings.lease_s))
    if got.state == "lost":
        _warn_lost(job_id, batch_id)
        return 0
    if got.state == "done":
        return 0
    keeper().hold(store, lease, settings.lease_s)
    written: int | None = None
    try:
        written = _run_claimed(engine, store, lease, items, got.deliveries, kept or {})
        return written
    except JobNotFoundError:
        _warn_lost(job_id, batch_id)
        return 0
    finally:
        keeper().drop(lease)
        if written is None:  # the write that would have released it did not happen: free it for the next delivery
            _release_quietly(store, lease)


def _run_claimed(engine: Serving, store: JobStore, lease: Lease, items: Sequence[tuple[int, str]],
                 deliveries: int, kept: Mapping[int, Kept]) -> int:
    settings = engine.settings
    job_id, batch_id = lease.job_id, lease.batch_id
    if deliveries > settings.max_deliveries:
        log.error("job %s batch %d: delivery %d > %d, giving up", job_id, batch_id, deliveries,
                  settings.max_deliveries)
        given_up = store.give_up_batch(job_id, batch_id, items, deliveries - 1, token=lease.token, kept=kept)
        metrics.count_errors(ErrorCode.WORKER_LOST, given_up)
        return given_up

    todo = store.unfinished(job_id, items) if deliveries > 1 else list(items)
    if not todo:  # an earlier delivery wrote everything after this one's claim: just end the batch
        return store.write_results(job_id, [], batch_id=batch_id, token=lease.token)
    deadline = time.monotonic() + settings.task_time_limit_s
    stage = "reading the model"
    version: str | None = None
    known: dict[int, ItemError] = {}  # items that already failed for their own reason keep that reason
    try:
        model = engine.model  # read once: the whole batch uses one model version
        version = model.version
        metrics.set_model(model.version, engine.device)
        stage = "fetch and decode"
        prepared = engine.fetch_prepare([url for _, url in todo], model, deadline=deadline)
        known = {index: item for (index, _), item in zip(todo, prepared, strict=True) if isinstance(item, ItemError)}
        stage = "the forward pass"
        tensors = [t for t in prepared if isinstance(t, torch.Tensor)]
        with metrics.stage("infer"):
            predictions = iter(engine.predict(model, tensors))
        stage = "building the records"
        records: list[dict[str, Any]] = []
        for (index, url), item in zip(todo, prepared, strict=True):
            if isinstance(item, ItemError):
                records.append(result_record(index, url, model_version=version, error=item, kept=kept.get(index)))
            else:
                records.append(result_record(index, url, topk=next(predictions), model_version=version,
                                             kept=kept.get(index)))
        stage = "writing the results"
        with metrics.stage("write"):
            written = store.write_results(job_id, records, batch_id=batch_id, token=lease.token)
    except (redis.RedisError, JobNotFoundError):
        raise  # Redis refused or lost the job: the caller decides (requeue, or drop with a warning)
    except Exception as exc:
        log.exception("job %s batch %d: %s failed; its unwritten items end as internal", job_id, batch_id, stage)
        text = f"{type(exc).__name__}: {exc}"[:_MESSAGE_MAX]
        internal = ItemError(ErrorCode.INTERNAL, f"the batch failed in {stage}: {text}")
        records = [result_record(index, url, model_version=version, error=known.get(index, internal),
                                 kept=kept.get(index))
                   for index, url in store.unfinished(job_id, items)]
        written = store.write_results(job_id, records, batch_id=batch_id, token=lease.token)
    metrics.count_results(records)
    return written


def _warn_lost(job_id: str, batch_id: int) -> None:
    with _lost_lock:
        first = job_id not in _lost_jobs
        if len(_lost_jobs) > 10_000:  # bounded: at worst a job is warned about twice
            _lost_jobs.clear()
        _lost_jobs.add(job_id)
    (log.warning if first else log.debug)(
        "job %s: Redis has no record of this job (expired, or lost in a restart without persistence); batch %d "
        "dropped without writing anything. To finish it: imgq reconcile %s URLS", job_id, batch_id, job_id)


def _release_quietly(store: JobStore, lease: Lease) -> None:
    try:
        store.release_lease(lease.job_id, lease.batch_id, lease.token)
    except redis.RedisError as exc:  # it expires by itself within IMGQ_LEASE
        log.warning("job %s batch %d: could not release its lease: %s", lease.job_id, lease.batch_id, exc)
