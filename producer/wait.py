"""Waiting for a job, with a progress bar on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from imgq.errors import ImgqError
from imgq.jobs import JobStatus, JobStore


@dataclass(frozen=True)
class StallRepair:
    """The producer's safety net for a batch lost in transit; the workers' sweep is the first one.

    kombu's Redis transport pops a message (BRPOP) before it records it as unacked, so a worker killed in
    between loses that message and no visibility timeout brings it back. The classify workers find such a
    batch themselves within about two ``IMGQ_SWEEP_INTERVAL`` and send it again from the payload kept in
    Redis (worker/sweep.py). If that has not happened (no worker sweeping, the payload lost with Redis), and
    the job has made no progress for ``after_s`` while its queue is empty, ``reenqueue`` enqueues its missing
    items again (a reconcile from the URL file) and says what it did. Results are first-wins, so an item that
    was only slow is not counted twice; the cost of a false alarm is repeated work.
    """

    after_s: float
    queue_empty: Callable[[], bool]
    reenqueue: Callable[[], str]


def wait_for_job(store: JobStore, job_id: str, *, progress: bool = True, timeout_s: float | None = None,
                 poll_s: float = 0.2, alive: Callable[[], None] | None = None, repair: StallRepair | None = None,
                 stream: TextIO = sys.stderr) -> JobStatus:
    """Poll until every submitted URL has a result. ``alive`` raises if the workers we depend on died;
    ``repair`` re-enqueues what a stalled job is missing."""
    start = time.monotonic()
    last_line = 0.0
    tty = stream.isatty()
    last_done, last_progress = -1, start
    while True:
        status = store.status(job_id)
        now = time.monotonic()
        if progress and (tty or now - last_line > 5 or status.state == "done"):
            _draw(stream, status, now - start, tty)
            last_line = now
        if status.state == "done":
            if progress and tty:
                stream.write("\n")
            return status
        if alive is not None:
            alive()
        if status.done != last_done:
            last_done, last_progress = status.done, now
        elif (repair is not None and status.submitted and now - last_progress > repair.after_s
              and repair.queue_empty()):
            stream.write(("\n" if progress and tty else "") + repair.reenqueue() + "\n")
            stream.flush()
            last_progress = now
        if timeout_s is not None and now - start > timeout_s:
            raise ImgqError(f"job {job_id} not done after {timeout_s:g} s: {status.pending} pending")
        time.sleep(poll_s)


def _draw(stream: TextIO, status: JobStatus, elapsed: float, tty: bool) -> None:
    width = 30
    frac = status.done / status.total if status.total else 1.0
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    rate = status.done / elapsed if elapsed > 0 else 0.0
    line = (f"[{bar}] {status.done}/{status.total} done, {status.failed} failed, "
            f"{rate:.0f} img/s, {status.state}")
    stream.write(("\r" + line) if tty else (line + "\n"))
    stream.flush()
