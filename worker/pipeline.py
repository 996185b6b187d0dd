"""One batch of (index, URL) pairs through fetch -> decode -> infer -> write back.

A plain function, called by the Celery task and directly by tests. A bad item never fails its batch:
every item of the batch ends with exactly one result record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from imgq.errors import ErrorCode, ItemError
from imgq.jobs import JobStore, result_record
from worker import metrics
from worker.engine import Engine

log = logging.getLogger(__name__)


def classify_batch(engine: Engine, store: JobStore, job_id: str, batch_id: int,
                   items: Sequence[tuple[int, str]]) -> int:
    """Returns how many results this call wrote (0 for a redelivered batch that was already done)."""
    deliveries = store.count_delivery(job_id, batch_id)
    if deliveries > engine.settings.max_deliveries:
        log.error("job %s batch %d: delivery %d > %d, giving up", job_id, batch_id, deliveries,
                  engine.settings.max_deliveries)
        given_up = store.give_up_batch(job_id, batch_id, items, deliveries - 1)
        metrics.count_errors(ErrorCode.WORKER_LOST, given_up)
        return given_up

    todo = store.unfinished(job_id, items) if deliveries > 1 else list(items)
    if not todo:
        return 0
    model = engine.model  # read once: the whole batch uses one model version
    metrics.set_model(model.version, engine.device)
    prepared = engine.fetch_prepare([url for _, url in todo], model)
    tensors = [t for t in prepared if isinstance(t, torch.Tensor)]
    with metrics.stage("infer"):
        predictions = iter(engine.predict(model, tensors))

    records: list[dict[str, Any]] = []
    for (index, url), item in zip(todo, prepared, strict=True):
        if isinstance(item, ItemError):
            records.append(result_record(index, url, model_version=model.version, error=item))
        else:
            records.append(result_record(index, url, topk=next(predictions), model_version=model.version))
    with metrics.stage("write"):
        written = store.write_results(job_id, records)
    metrics.count_results(records)
    return written

