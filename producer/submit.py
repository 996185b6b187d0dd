"""Submitting a job: record it in Redis and enqueue its URLs in batches, streaming the input.

An item with nothing to fetch (:class:`producer.sources.Unfetchable`: a line of a URL file that was not valid
UTF-8, a table row whose URL cell is empty) is answered here, at submit time, with an ``invalid_url`` result
naming the line or row: it counts in the job like any item, and is never sent to a worker (replacement
characters would make it a different URL).

A table's kept columns (:class:`producer.sources.TableUrl`) travel in the batch's message and in its pending
payload (``[index, url, {column: value}]``, :func:`imgq.jobs.item_rows`), and the worker merges them into
each record: Redis holds them only while their batch is in flight.

Each batch is counted in the job record just before its message is sent, and only if Redis has room for
the message (``JobStore.reserve_batch``). So when Redis is full (maxmemory with ``noeviction``) or refuses
a write for another reason, the submission stops with an :class:`EnqueueError` that says exactly which
part was accepted, and the job's ``total`` matches what is queued. ``imgq reconcile`` enqueues the rest.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import redis
from celery import Celery
from kombu.exceptions import KombuError

from imgq.celery_app import CLASSIFY_TASK
from imgq.errors import ErrorCode, ImgqError, ItemError
from imgq.jobs import JobStore, Kept, RedisFullError, item_rows, result_record
from imgq.settings import Settings
from producer.sources import Unfetchable, kept_of

log = logging.getLogger(__name__)

# Progress is reported once per this many batches, not per message.
_PROGRESS_EVERY = 64
# What Redis refusing a write looks like: redis-py's errors from the job store, kombu's from the broker.
_REFUSED = (RedisFullError, redis.RedisError, KombuError)

Batch = Sequence[tuple[int, str]]


class EnqueueError(ImgqError):
    """Redis refused a write part-way: the message says which part of the job was accepted."""

    def __init__(self, job_id: str, *, items: int, batches: int, refused: int, cause: BaseException) -> None:
        self.job_id = job_id
        self.items = items
        self.batches = batches
        counted = (f" The job also counts the {refused} URLs of the batch that was refused; reconcile enqueues "
                   "them too." if refused else "")
        why = cause if isinstance(cause, RedisFullError) else f"Redis refused a write ({type(cause).__name__}: {cause})"
        super().__init__(
            f"submission stopped: {why}. Job {job_id}: {items} URLs in {batches} batches were accepted and will "
            f"be classified; the rest was not enqueued.{counted} Once Redis accepts writes again (free memory or "
            f"raise maxmemory if it is full), enqueue the rest with: imgq reconcile {job_id} URLS")


def submit_urls(urls: Iterable[str], *, settings: Settings, store: JobStore, app: Celery,
                on_progress: Callable[[int], None] | None = None) -> str:
    """Enqueue every URL; returns the job id. Memory stays flat whatever the length of ``urls``."""
    try:
        job_id = store.create_job()
    except redis.RedisError as exc:
        raise ImgqError(f"Redis refused to create the job ({type(exc).__name__}: {exc}); nothing was "
                        "enqueued") from exc
    numbered = enumerate(urls)
    batches = iter(lambda: list(itertools.islice(numbered, settings.batch_size)), [])
    items, sent = enqueue_batches(job_id, batches, counted=0, settings=settings, store=store, app=app,
                                  on_progress=on_progress)
    try:
        store.finish_submission(job_id)
    except redis.RedisError as exc:
        raise EnqueueError(job_id, items=items, batches=sent, refused=0, cause=exc) from exc
    return job_id


def enqueue_batches(job_id: str, batches: Iterable[Batch], *, counted: int, settings: Settings, store: JobStore,
                    app: Celery, on_progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Send batches of (index, URL) pairs; indices >= ``counted`` are added to the job's total.

    Returns (items, batches) sent. Raises :class:`EnqueueError` if Redis refuses a write.
    """
    queue = settings.classify_queue
    items = sent = refused = 0
    try:
        depth = store.queue_depth(queue)
        paused = False  # said once per submission: a big job fills the queue again every few batches
        with app.producer_or_acquire() as producer:
            for batch in batches:
                if depth >= settings.max_queue_depth:
                    depth = _wait_for_room(store, settings, say=not paused)
                    paused = True
                refused = 0
                kept: dict[int, Kept] = {i: k for i, url in batch if (k := kept_of(url))}
                batch_id, depth = store.reserve_batch(job_id, new_items=sum(i >= counted for i, _ in batch),
                                                      queue=queue, message_bytes=_message_bytes(batch, kept),
                                                      items=batch, kept=kept)
                refused = len(batch)  # counted, not yet sent
                send = _answer_unfetchable(job_id, batch, store)
                refused = len(send)
                if send:
                    # argsrepr given: Celery would otherwise saferepr() all the URLs into a header, ~20% of a send.
                    app.send_task(CLASSIFY_TASK, args=[job_id, batch_id, item_rows(send, kept)], queue=queue,
                                  producer=producer, argsrepr=f"[{job_id!r}, {batch_id}, <{len(send)} URLs>]")
                    depth += 1
                refused = 0
                items += len(batch)
                sent += 1
                if on_progress and sent % _PROGRESS_EVERY == 0:
                    on_progress(items)
    except _REFUSED as exc:
        raise EnqueueError(job_id, items=items, batches=sent, refused=refused, cause=exc) from exc
    if on_progress:
        on_progress(items)
    return items, sent


def _answer_unfetchable(job_id: str, batch: Batch, store: JobStore) -> Batch:
    """Write the ``invalid_url`` result of each item with nothing to fetch (a line that was not valid UTF-8: its
    text is not what the file said; a row with no URL), kept columns included; returns the rest of the batch,
    to be sent."""
    bad = [(i, url) for i, url in batch if isinstance(url, Unfetchable)]
    if not bad:
        return batch
    store.write_results(job_id, [result_record(i, str(url), error=ItemError(ErrorCode.INVALID_URL, url.reason),
                                               kept=url.kept)
                                 for i, url in bad if isinstance(url, Unfetchable)])
    return [(i, url) for i, url in batch if not isinstance(url, Unfetchable)]


def _message_bytes(batch: Batch, kept: dict[int, Kept]) -> int:
    # kombu base64-encodes the body (x4/3) in a ~2 KB envelope; Redis reads the command into a query buffer
    # that may grow by doubling (x2) before it compares used memory with maxmemory.
    return 2 * (len(json.dumps(item_rows(batch, kept))) * 4 // 3 + 2048)


def _wait_for_room(store: JobStore, settings: Settings, *, say: bool = True) -> int:
    """Backpressure: pause while the queue holds IMGQ_MAX_QUEUE_DEPTH batches or more, so one producer never
    makes it deeper than that. Returns the depth once there is room. ``say``: log that it waits (the first
    pause of a submission only)."""
    warned = not say
    while (depth := store.queue_depth(settings.classify_queue)) >= settings.max_queue_depth:
        if not warned:
            log.warning("queue %s holds %d batches (IMGQ_MAX_QUEUE_DEPTH=%d); waiting for workers (said once)",
                        settings.classify_queue, depth, settings.max_queue_depth)
            warned = True
        time.sleep(0.5)
    return depth
