"""`imgq reconcile JOB URLS`: find a job's items that have no result and enqueue them again.

For when results were lost (Redis restarted without persistence for the last writes, a batch dropped
while Redis was out of memory) or a submission stopped part-way (`imgq submit` refused by a full Redis).

URLs are not stored per item in Redis (that would double a job's memory), so reconcile reads the URL
file the job was submitted from: an item's index is its position in that file, counted as `imgq submit`
counts (blank lines and `#` comments skipped). Every result record names its URL, so a different file is
detected and refused. Enqueuing an item that is still queued is harmless: results are first-wins.

If Redis has no record of the job at all (expired, or lost in a restart without persistence), reconcile
recreates it under the same id from the file: ``total`` is the file's URL count, and every URL without a
result is enqueued.

`imgq submit --wait` and `imgq run` do the same by themselves when a job stalls (:func:`stall_repair`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from celery import Celery

from imgq.errors import ImgqError
from imgq.jobs import JobNotFoundError, JobStatus, JobStore, is_job_id
from imgq.settings import Settings
from producer.submit import enqueue_batches
from producer.wait import StallRepair

# Results are read (HMGET) this many at a time.
_CHUNK = 5000


@dataclass(frozen=True)
class ReconcileReport:
    job_id: str
    urls: int  # URLs in the file
    missing: int  # items that had no result
    enqueued_batches: int
    added: int  # items past the accepted part of an interrupted submission, now counted in the job
    recreated_from: str | None = None  # the job record was gone and was recreated from this file
    dry_run: bool = False

    def describe(self) -> str:
        if self.recreated_from is not None:
            lost = (f"job {self.job_id}: job record was lost: {'would be ' if self.dry_run else ''}recreated from "
                    f"{self.recreated_from} with {self.urls} URLs; ")
            if not self.missing:
                return lost + "every URL has a result; nothing to enqueue"
            verb = "would enqueue them" if self.dry_run else f"enqueued in {self.enqueued_batches} batches"
            return lost + f"{self.missing} of {self.urls} URLs had no result; {verb}"
        if not self.missing:
            return f"job {self.job_id}: all {self.urls} URLs have a result; nothing to enqueue"
        extra = f" ({self.added} of them never submitted before)" if self.added else ""
        return (f"job {self.job_id}: {self.missing} of {self.urls} URLs had no result{extra}; "
                f"enqueued again in {self.enqueued_batches} batches")


def find_missing(store: JobStore, status: JobStatus, urls: Iterable[str]) -> tuple[int, list[tuple[int, str]]]:
    """(URLs in the file, the (index, URL) pairs that have no result). Refuses a file that is not the job's."""
    numbered = enumerate(urls)
    count = 0
    missing: list[tuple[int, str]] = []
    while chunk := list(itertools.islice(numbered, _CHUNK)):
        count += len(chunk)
        for (index, url), record in zip(chunk, store.results_at(status.job_id, [i for i, _ in chunk]), strict=True):
            if record is None:
                missing.append((index, url))
            elif (recorded := record["url"]) != url:
                raise ImgqError(f"the URL file does not match job {status.job_id}: line for index {index} is "
                                f"{url!r} but the job's result is for {recorded!r}; pass the file you submitted")
    if count < status.total or (status.submitted and count > status.total):
        raise ImgqError(f"the URL file has {count} URLs but job {status.job_id} has {status.total}; pass the file "
                        "you submitted")
    return count, missing


def reconcile_job(job_id: str, urls: Iterable[str], *, settings: Settings, store: JobStore, app: Celery,
                  dry_run: bool = False, source: str = "the URL file") -> ReconcileReport:
    """``source`` names the file in the report."""
    try:
        status = store.status(job_id)
    except JobNotFoundError:
        if not is_job_id(job_id):
            raise ImgqError(f"no job {job_id!r} in Redis, and {job_id!r} is not an imgq job id (32 hex digits, "
                            "the last line `imgq submit` printed)") from None
        return _recreate(job_id, urls, settings=settings, store=store, app=app, dry_run=dry_run, source=source)
    count, missing = find_missing(store, status, urls)
    added = sum(i >= status.total for i, _ in missing)
    batches = 0
    if missing and not dry_run:
        _, batches = enqueue_batches(job_id, _batches(missing, settings.batch_size), counted=status.total,
                                     settings=settings, store=store, app=app)
    if not status.submitted and not dry_run:
        store.finish_submission(job_id)  # the rest of an interrupted submission is now enqueued
    return ReconcileReport(job_id=job_id, urls=count, missing=len(missing), enqueued_batches=batches, added=added)


def _recreate(job_id: str, urls: Iterable[str], *, settings: Settings, store: JobStore, app: Celery, dry_run: bool,
              source: str) -> ReconcileReport:
    """The job record is gone: recreate it from the file under the same id, and enqueue what has no result.

    Results may have outlived the record (they expire later than it), so they are kept and checked against
    the file as usual; the record counts them. Its ``total`` is set before anything is enqueued, so the job
    cannot look done early."""
    blank = JobStatus(job_id=job_id, total=0, done=0, failed=0, submitted=False, dead_batches=0, created=0.0)
    count, missing = find_missing(store, blank, urls)
    batches = 0
    if not dry_run:
        kept = [r for r in store.iter_results(job_id, count) if r is not None]
        store.create_job({"recreated": "1"}, job_id=job_id, total=count, failed=sum(r["error"] is not None
                                                                                  for r in kept))
        if missing:
            _, batches = enqueue_batches(job_id, _batches(missing, settings.batch_size), counted=count,
                                         settings=settings, store=store, app=app)
        store.finish_submission(job_id)
    return ReconcileReport(job_id=job_id, urls=count, missing=len(missing), enqueued_batches=batches, added=0,
                           recreated_from=source, dry_run=dry_run)


def _batches(items: list[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def stall_after_s(settings: Settings) -> float:
    """How long a job may make no progress, its queue empty, before its missing items are enqueued again:
    past the visibility timeout plus kombu's restore sweep, by when a dead worker's batches are back."""
    return 2 * settings.visibility_timeout_s + 10


def stall_repair(job_id: str, urls: Callable[[], Iterable[str]], *, settings: Settings, store: JobStore,
                 app: Celery) -> StallRepair:
    """Reconcile ``job_id`` from ``urls()`` (the submitted URLs, read again) when it stalls."""
    after = stall_after_s(settings)

    def reenqueue() -> str:
        report = reconcile_job(job_id, urls(), settings=settings, store=store, app=app)
        return f"no progress for {after:g} s and the queue is empty: {report.describe()}"

    return StallRepair(after_s=after, queue_empty=lambda: store.queue_depth(settings.classify_queue) == 0,
                       reenqueue=reenqueue)
