"""Submitting a job: record it in Redis and enqueue its URLs in batches, streaming the input."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable

from celery import Celery

from imgq.jobs import JobStore
from imgq.settings import Settings
from worker.app import CLASSIFY_TASK

log = logging.getLogger(__name__)

# Counters and the queue depth are checked once per this many batches, not per message.
_FLUSH_EVERY = 64


def submit_urls(urls: Iterable[str], *, settings: Settings, store: JobStore, app: Celery,
                on_progress: Callable[[int], None] | None = None) -> str:
    """Enqueue every URL; returns the job id. Memory stays flat whatever the length of ``urls``."""
    job_id = store.create_job()
    batch_id = 0
    pending_items = pending_batches = 0
    enqueued = 0
    numbered = enumerate(urls)
    with app.producer_or_acquire() as producer:
        while chunk := list(itertools.islice(numbered, settings.batch_size)):
            app.send_task(CLASSIFY_TASK, args=[job_id, batch_id, chunk], queue=settings.classify_queue,
                          producer=producer)
            batch_id += 1
            pending_items += len(chunk)
            pending_batches += 1
            if pending_batches >= _FLUSH_EVERY:
                store.add_batches(job_id, items=pending_items, batches=pending_batches)
                enqueued += pending_items
                pending_items = pending_batches = 0
                if on_progress:
                    on_progress(enqueued)
                _wait_for_room(store, settings)
    store.add_batches(job_id, items=pending_items, batches=pending_batches)
    store.finish_submission(job_id)
    if on_progress:
        on_progress(enqueued + pending_items)
    return job_id


def _wait_for_room(store: JobStore, settings: Settings) -> None:
    """Backpressure: don't fill Redis faster than workers drain it."""
    warned = False
    while store.r.llen(settings.classify_queue) > settings.max_queue_depth:
        if not warned:
            log.warning("queue %s deeper than %d batches (IMGQ_MAX_QUEUE_DEPTH); waiting for workers",
                        settings.classify_queue, settings.max_queue_depth)
            warned = True
        time.sleep(0.5)
