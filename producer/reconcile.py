"""`imgq reconcile JOB INPUT` and `imgq submit --resume JOB INPUT`: enqueue a job's items that have no result.

For when results were lost (Redis restarted without persistence for the last writes, a batch dropped
while Redis was out of memory), a submission stopped part-way (`imgq submit` refused by a full Redis, a
crash, a Ctrl-C) or the job expired (IMGQ_JOB_TTL).

Neither URLs nor kept columns are stored per item in Redis (that would hold a job's whole input for its
life), so reconcile reads the input the job was submitted from, a URL file or a table with the same
``--url-column``/``--keep``: an item's index is its position there, counted as `imgq submit` counts (blank
lines and `#` comments skipped; every table row). Every result record names its URL and carries its kept
columns, so a different file, or different ``--keep`` columns, is detected and refused. What has a result is
asked of :meth:`imgq.jobs.JobStore.missing_indices` (the authority on what is done, exported results
included), a window of items at a time. Enqueuing an item that is still queued is harmless: results are
first-wins.

A readable file is read twice: once to check it against the job and count what is missing, then again to
enqueue it, so memory stays flat whatever its size and nothing is enqueued for a file that is not the
job's. Stdin can be read once only: its missing items are held in memory.

If Redis has no record of the job at all (expired, or lost in a restart without persistence), reconcile
recreates it under the same id from the file: ``total`` is the file's item count, and every item without a
result is enqueued.

`imgq submit --wait` and `imgq run` do the same by themselves when a job stalls (:func:`stall_repair`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from celery import Celery

from imgq.errors import ImgqError
from imgq.jobs import RECORD_FIELDS, JobNotFoundError, JobStatus, JobStore, is_job_id
from imgq.settings import Settings
from producer.submit import enqueue_batches
from producer.wait import StallRepair

# Items checked (one HMGET of their results, one window of missing_indices) at a time.
_CHUNK = 5000
_OWN_FIELDS = frozenset(RECORD_FIELDS)

Item = tuple[int, str]


@dataclass(frozen=True)
class ReconcileReport:
    job_id: str
    urls: int  # items in the file
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
        verb = "would enqueue them again" if self.dry_run else f"enqueued again in {self.enqueued_batches} batches"
        return f"job {self.job_id}: {self.missing} of {self.urls} URLs had no result{extra}; {verb}"


class Scan:
    """One pass over a job's input: yields the items that have no result, a window at a time, after checking
    the window's results against it (the URL, the kept columns); at the end, the item count against the
    job's. ``count``: items read so far."""

    def __init__(self, store: JobStore, status: JobStatus, urls: Iterable[str], *, keep: Sequence[str] = (),
                 check: bool = True) -> None:
        self.store, self.status, self.urls, self.check = store, status, urls, check
        self.keep = frozenset(keep)
        self.count = 0

    def __iter__(self) -> Iterator[Item]:
        job_id = self.status.job_id
        numbered = enumerate(self.urls)
        while chunk := list(itertools.islice(numbered, _CHUNK)):
            self.count += len(chunk)
            if self.check:
                for (index, url), record in zip(chunk, self.store.results_at(job_id, [i for i, _ in chunk]),
                                                strict=True):
                    if record is not None:
                        self._check(index, url, record)
            missing = set(self.store.missing_indices(job_id, chunk[-1][0] + 1, start=chunk[0][0]))
            yield from (item for item in chunk if item[0] in missing)
        status = self.status
        if self.count < status.total or (status.submitted and self.count > status.total):
            raise ImgqError(f"the input has {self.count} URLs but job {job_id} has {status.total}; pass the file "
                            "you submitted")

    def _check(self, index: int, url: str, record: dict[str, object]) -> None:
        job_id = self.status.job_id
        if (recorded := record["url"]) != url:
            raise ImgqError(f"the input does not match job {job_id}: the item at index {index} is {url!r} but the "
                            f"job's result is for {recorded!r}; pass the file you submitted")
        if (kept := set(record) - _OWN_FIELDS) != self.keep:
            had = f"--keep {','.join(sorted(kept))}" if kept else "no --keep"
            given = f"--keep {','.join(sorted(self.keep))}" if self.keep else "no --keep"
            raise ImgqError(f"job {job_id} was submitted with {had}, not {given}: its results carry the columns it "
                            "kept; pass the same --keep (and --url-column)")


def find_missing(store: JobStore, status: JobStatus, urls: Iterable[str], *,
                 keep: Sequence[str] = ()) -> tuple[int, list[Item]]:
    """(items in the file, the (index, URL) pairs that have no result). Refuses a file that is not the job's."""
    scan = Scan(store, status, urls, keep=keep)
    missing = list(scan)
    return scan.count, missing


def reconcile_job(job_id: str, urls: Iterable[str], *, settings: Settings, store: JobStore, app: Celery,
                  dry_run: bool = False, source: str = "the URL file", keep: Sequence[str] = (),
                  reread: Callable[[], Iterable[str]] | None = None) -> ReconcileReport:
    """``urls``: the job's input; ``reread`` reads it again (None for stdin: then what is missing is held in
    memory); ``keep``: the kept columns it was submitted with; ``source`` names the file in the report."""
    try:
        status = store.status(job_id)
    except JobNotFoundError:
        if not is_job_id(job_id):
            raise ImgqError(f"no job {job_id!r} in Redis, and {job_id!r} is not an imgq job id (32 hex digits, "
                            "the last line `imgq submit` printed)") from None
        return _recreate(job_id, urls, settings=settings, store=store, app=app, dry_run=dry_run, source=source,
                         keep=keep, reread=reread)
    count, missing, todo = _plan(store, status, urls, keep=keep, reread=reread)
    added = max(0, count - status.total) if missing else 0
    batches = 0
    if missing and not dry_run:
        _, batches = enqueue_batches(job_id, _batches(todo(), settings.batch_size), counted=status.total,
                                     settings=settings, store=store, app=app)
    if not status.submitted and not dry_run:
        store.finish_submission(job_id)  # the rest of an interrupted submission is now enqueued
    return ReconcileReport(job_id=job_id, urls=count, missing=missing, enqueued_batches=batches, added=added,
                           dry_run=dry_run)


def _plan(store: JobStore, status: JobStatus, urls: Iterable[str], *, keep: Sequence[str],
          reread: Callable[[], Iterable[str]] | None) -> tuple[int, int, Callable[[], Iterator[Item]]]:
    """(items, items missing, what gives the missing items): a checking pass, and a second, unchecked one over
    the file read again; for stdin, the missing items of the one pass."""
    scan = Scan(store, status, urls, keep=keep)
    if reread is None:
        held = list(scan)
        return scan.count, len(held), lambda: iter(held)
    missing = sum(1 for _ in scan)
    return scan.count, missing, lambda: iter(Scan(store, status, reread(), keep=keep, check=False))


def _recreate(job_id: str, urls: Iterable[str], *, settings: Settings, store: JobStore, app: Celery, dry_run: bool,
              source: str, keep: Sequence[str], reread: Callable[[], Iterable[str]] | None) -> ReconcileReport:
    """The job record is gone: recreate it from the file under the same id, and enqueue what has no result.

    Results may have outlived the record (they expire later than it), so they are kept and checked against
    the file as usual; the record counts them. Its ``total`` is set before anything is enqueued, so the job
    cannot look done early."""
    blank = JobStatus(job_id=job_id, total=0, done=0, failed=0, submitted=False, dead_batches=0, created=0.0)
    count, missing, todo = _plan(store, blank, urls, keep=keep, reread=reread)
    batches = 0
    if not dry_run:
        failed = sum(1 for r in store.iter_results(job_id, count) if r is not None and r["error"] is not None)
        store.create_job({"recreated": "1"}, job_id=job_id, total=count, failed=failed)
        if missing:
            _, batches = enqueue_batches(job_id, _batches(todo(), settings.batch_size), counted=count,
                                         settings=settings, store=store, app=app)
        store.finish_submission(job_id)
    return ReconcileReport(job_id=job_id, urls=count, missing=missing, enqueued_batches=batches, added=0,
                           recreated_from=source, dry_run=dry_run)


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    return iter(lambda: list(itertools.islice(items, size)), [])


def stall_after_s(settings: Settings) -> float:
    """How long a job may make no progress, its queue empty, before its missing items are enqueued again:
    past the visibility timeout plus kombu's restore sweep, by when a dead worker's batches are back."""
    return 2 * settings.visibility_timeout_s + 10


def stall_repair(job_id: str, urls: Callable[[], Iterable[str]], *, settings: Settings, store: JobStore,
                 app: Celery, keep: Sequence[str] = ()) -> StallRepair:
    """Reconcile ``job_id`` from ``urls()`` (the submitted input, read again) when it stalls."""
    after = stall_after_s(settings)

    def reenqueue() -> str:
        report = reconcile_job(job_id, urls(), settings=settings, store=store, app=app, keep=keep, reread=urls)
        return f"no progress for {after:g} s and the queue is empty: {report.describe()}"

    return StallRepair(after_s=after, queue_empty=lambda: store.queue_depth(settings.classify_queue) == 0,
                       reenqueue=reenqueue)
