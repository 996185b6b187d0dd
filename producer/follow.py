"""`imgq results JOB --follow -o DIR/`: results leave Redis as they finish, into numbered part files.

Redis then holds what is in flight, not the whole job: a finished result waits in the results hash only
until the next part is written (at most ``part_size`` of them), and then costs one bit (the job's
``exported`` bitmap, :mod:`imgq.jobs`). Parts are ``part-00000.parquet`` (or ``.jsonl``), ``part-00001``, ...
in the order results finished: a part holds up to ``part_size`` records sorted by index, and the parts
together hold every index of the job exactly once (sort by ``index`` for input order).

One part, crash-safe (the exporter may be SIGKILLed at any line):

1. read up to ``part_size`` results from the results hash (they stay there);
2. write them to ``.part-<n>.<ext>.tmp``, fsync, rename to ``part-<n>.<ext>``, fsync the directory;
3. commit, in one Lua call: delete those results from the hash, set their bits, and move the job's export
   cursor (``imgq:job:<id>:export``, field ``part``) from n to n + 1.

Why a cursor of part numbers, and not one of indices: the commit is atomic in Redis, and the part number is
the only thing that ties a file on disk to it. A part numbered below the cursor is committed: its results have
left Redis, and it is the only copy. A part numbered at or past the cursor is not: the exporter died between
its rename (2) and its commit (3), its results are all still in Redis, and a restart deletes it before
writing part n again from what Redis holds (perhaps more results than the first try had). So a restarted
exporter neither loses (nothing leaves Redis before its file is durable) nor duplicates (a file whose results
are still in Redis is removed first). Deleting first and writing second would lose a part to a crash between
them; keeping uncommitted files would write their results twice.

That reasoning needs the cursor and the directory to agree, so the export is bound to its directory and
format (the cursor records both; another directory is refused), and one exporter at a time holds the job (a
lease in Redis, ``IMGQ_LEASE``, renewed while it runs; a SIGKILLed exporter's lease expires within one lease,
and a restart waits for it). The commit checks the lease too: an exporter that stalled past its lease and
was replaced cannot commit. A redelivered batch cannot write a second result for an exported index: the
write checks its bit (:mod:`imgq.jobs`).

A committed part is final once its path is printed on stdout; a part file that exists but was not printed
may still be replaced by a restart.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgq.errors import ImgqError
from imgq.jobs import JobStore
from producer.export import write_records

FOLLOW_FORMATS = ("parquet", "jsonl")
# Records a part: Redis holds at most this many finished results a job (~100-300 bytes each) before they
# leave; 100M URLs make 1,000 parts.
PART_SIZE = 100_000
# How often the exporter looks at the job when a part is not yet full.
POLL_S = 0.5
_PART = re.compile(r"part-(\d+)\.(parquet|jsonl)")
_TMP = re.compile(r"\.part-\d+\.(parquet|jsonl)\.tmp")


def part_name(part: int, fmt: str) -> str:
    return f"part-{part:05d}.{fmt}"


@dataclass
class FollowReport:
    job_id: str
    directory: Path
    first_part: int  # the cursor this run started from: parts below it were committed before
    parts: int = 0  # committed by this run
    records: int = 0  # in the parts this run committed
    removed: list[str] = field(default_factory=list)  # uncommitted files of a stopped exporter, deleted
    lacking: list[str] = field(default_factory=list)  # committed parts no longer in the directory

    def describe(self) -> str:
        run = (f"{self.records} results in {self.parts} parts "
               f"({part_name(self.first_part, '*')}..{part_name(self.first_part + self.parts - 1, '*')})"
               if self.parts else "no new results")
        before = f"; {self.first_part} parts were written before" if self.first_part else ""
        return f"job {self.job_id}: exported {run} to {self.directory}{before}"


def follow_job(store: JobStore, job_id: str, directory: Path, *, fmt: str = "parquet", part_size: int = PART_SIZE,
               lease_s: float = 30.0, poll_s: float = POLL_S,
               on_part: Callable[[Path, int], None] | None = None,
               on_note: Callable[[str], None] | None = None) -> FollowReport:
    """Export ``job_id``'s results into ``directory`` as they finish, until the job is done and none is left
    in Redis. ``on_part(path, records)`` after each commit; ``on_note`` for what the user should know."""
    if fmt not in FOLLOW_FORMATS:
        raise ValueError(f"unknown part format {fmt!r}; choose one of {', '.join(FOLLOW_FORMATS)}")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    lease_ms = max(1, int(lease_s * 1000))
    part = _take(store, job_id, token, lease_ms, directory, fmt, on_note)
    report = FollowReport(job_id, directory, first_part=part)
    try:
        report.removed, report.lacking = _tidy(directory, part)
        if on_note and report.removed:
            on_note(f"removed {', '.join(report.removed)}: written by an exporter that stopped before committing "
                    "it; its results are still in Redis and go into a new part")
        if on_note and report.lacking:
            on_note(f"{len(report.lacking)} committed parts are no longer in {directory} (e.g. {report.lacking[0]}): "
                    "their results left Redis when they were written, and only those files had them")
        while True:
            if not store.renew_export(job_id, token, lease_ms=lease_ms):
                raise ImgqError(f"job {job_id}: this exporter lost its lease (it stalled past IMGQ_LEASE="
                                f"{lease_s:g} s); another exporter may have taken over; run it again to go on")
            done = store.status(job_id).state == "done"
            waiting = store.results_in_redis(job_id)
            if waiting >= part_size or (done and waiting):
                records = store.take_results(job_id, part_size)
                path = _write_part(directory, part, fmt, records)
                part = store.commit_export(job_id, token, part, [int(r["index"]) for r in records])
                report.parts += 1
                report.records += len(records)
                if on_part:
                    on_part(path, len(records))
            elif done:
                return report
            else:
                time.sleep(poll_s)
    finally:
        store.release_export(job_id, token)


def _take(store: JobStore, job_id: str, token: str, lease_ms: int, directory: Path, fmt: str,
          on_note: Callable[[str], None] | None) -> int:
    """The job's exporter lease; waits out a stopped exporter's (it expires within one lease)."""
    deadline = time.monotonic() + 3 * lease_ms / 1000 + 5
    noted = False
    while True:
        lease = store.take_export(job_id, token, lease_ms=lease_ms, directory=str(directory), fmt=fmt)
        if lease.state == "taken":
            return lease.part
        if lease.state == "bound":
            raise ImgqError(f"job {job_id} is already exported to {lease.directory} as {lease.fmt} (its parts are "
                            f"numbered there); go on there: imgq results {job_id} --follow -o {lease.directory} "
                            f"--format {lease.fmt}")
        if time.monotonic() > deadline:
            raise ImgqError(f"job {job_id}: another `imgq results --follow` is exporting it (its lease keeps being "
                            "renewed); stop that one first, or let it finish")
        if on_note and not noted:
            on_note(f"job {job_id}: another exporter holds the export for {lease.held_ms / 1000:.1f} s more "
                    "(stopped? its lease then expires); waiting")
            noted = True
        time.sleep(min(1.0, max(0.05, lease.held_ms / 1000)))


def _tidy(directory: Path, part: int) -> tuple[list[str], list[str]]:
    """Delete what is not committed (parts numbered ``part`` or more, temporary files); list the committed
    parts that are missing."""
    removed: list[str] = []
    present: set[int] = set()
    for entry in sorted(os.listdir(directory)):
        if (m := _PART.fullmatch(entry)) is not None and int(m[1]) < part:
            present.add(int(m[1]))
        elif m is not None or _TMP.fullmatch(entry):
            (directory / entry).unlink()
            removed.append(entry)
    if removed:
        _fsync_dir(directory)
    return removed, [part_name(n, "*") for n in range(part) if n not in present]


def _write_part(directory: Path, part: int, fmt: str, records: list[dict[str, object]]) -> Path:
    final = directory / part_name(part, fmt)
    tmp = directory / f".{final.name}.tmp"
    write_records(records, tmp, fmt)  # flushed and fsynced
    os.replace(tmp, final)
    _fsync_dir(directory)  # the rename is durable before the commit deletes the results from Redis
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
