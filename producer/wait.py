"""Waiting for a job: progress on stderr (tqdm on a terminal), the stall net of a waiting producer.

Progress shows done/total, failed, the rate since the wait began (items done meanwhile over the time
waited, so a job half done before the wait does not count its first half as speed) and an ETA from that
rate. It is drawn only on a terminal unless asked (``progress=True``: then one plain line every
``_LINE_EVERY_S`` where stderr is a file or a pipe).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import redis
from tqdm import tqdm

from imgq.errors import ImgqError
from imgq.jobs import JobStatus, JobStore

log = logging.getLogger(__name__)

# A progress line this often where stderr is not a terminal (a log file does not want ten a second).
_LINE_EVERY_S = 2.0
# A waiting producer rides out a Redis restart this long before it gives up (the job itself is not lost
# with the connection: `imgq status JOB` finds it again).
_OUTAGE_S = 30.0


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


class Progress:
    """One job's progress on ``stream``: a tqdm bar on a terminal, else a plain line every few seconds."""

    def __init__(self, stream: TextIO, enabled: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.enabled = self.tty if enabled is None else enabled
        self.start = time.monotonic()
        self._first_done: int | None = None
        self._last_line = 0.0
        self._bar: tqdm[None] | None = None  # made at the first update, when the total is known

    def describe(self, status: JobStatus, now: float | None = None) -> str:
        """``done/total``, failed, the true rate since the wait began, and an ETA."""
        now = time.monotonic() if now is None else now
        if self._first_done is None:
            self._first_done = status.done
        elapsed = now - self.start
        rate = (status.done - self._first_done) / elapsed if elapsed > 0 else 0.0
        left = status.total - status.done
        eta = "?" if left > 0 and rate <= 0 else tqdm.format_interval(max(left, 0) / rate if left > 0 else 0)
        return f"{status.failed} failed, {rate:.1f} img/s, ETA {eta}, {status.state}"

    def update(self, status: JobStatus) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        tail = self.describe(status, now)
        if self.tty and self._bar is None:
            self._bar = tqdm(total=status.total, initial=status.done, file=self.stream, unit="img",
                             dynamic_ncols=True, bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")
        if self._bar is not None:
            self._bar.total = status.total
            self._bar.n = status.done
            self._bar.set_postfix_str(tail, refresh=False)
            self._bar.refresh()
        elif now - self._last_line >= _LINE_EVERY_S or status.state == "done":
            self.stream.write(f"{status.done}/{status.total} done, {tail}\n")
            self.stream.flush()
            self._last_line = now

    def say(self, line: str) -> None:
        """A line that must not be lost in the bar (e.g. what the stall net did)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def wait_for_job(store: JobStore, job_id: str, *, progress: bool | None = None, timeout_s: float | None = None,
                 poll_s: float = 0.2, alive: Callable[[], None] | None = None, repair: StallRepair | None = None,
                 stream: TextIO = sys.stderr) -> JobStatus:
    """Poll until every submitted URL has a result. ``progress``: None draws it on a terminal only, True
    always, False never. ``alive`` raises if the workers we depend on died; ``repair`` re-enqueues what a
    stalled job is missing."""
    bar = Progress(stream, progress)
    start = bar.start
    last_done, last_progress = -1, start
    # How long to sleep between polls: never more than poll_s, less when the job should end sooner (its
    # pending items at the rate seen so far), so a short job's end is noticed within ~20 ms, not poll_s.
    pause = poll_s
    first: tuple[float, int] | None = None  # (time, done) of the first progress seen
    outage_since: float | None = None
    try:
        while True:
            try:
                status = store.status(job_id)
            except (redis.ConnectionError, redis.TimeoutError):
                # A restart of Redis: keep waiting a while (AuthenticationError is a ConnectionError too, but
                # a password does not change mid-wait, so it ends like the rest once the outage is too long).
                now = time.monotonic()
                outage_since = now if outage_since is None else outage_since
                if now - outage_since > _OUTAGE_S:
                    raise
                log.warning("lost Redis while waiting for job %s; retrying", job_id)
                time.sleep(1.0)
                continue
            outage_since = None
            now = time.monotonic()
            bar.update(status)
            if status.state == "done":
                return status
            if alive is not None:
                alive()
            if status.done != last_done:
                last_done, last_progress = status.done, now
            elif (repair is not None and status.submitted and now - last_progress > repair.after_s
                  and repair.queue_empty()):
                bar.say(repair.reenqueue())
                last_progress = now
            if timeout_s is not None and now - start > timeout_s:
                raise ImgqError(f"job {job_id} not done after {timeout_s:g} s: {status.pending} pending")
            if status.done > 0 and first is None:
                first = (now, status.done)
            elif first is not None and status.done > first[1] and now > first[0]:
                eta = status.pending * (now - first[0]) / (status.done - first[1])
                pause = min(poll_s, max(0.02, eta / 2))
            time.sleep(pause)
    finally:
        bar.close()
