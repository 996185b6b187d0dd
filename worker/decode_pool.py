"""The decode thread pool, with a per-image CPU deadline: one stuck image cannot stall a batch or the pool.

A decode runs for at most ``IMGQ_DECODE_TIMEOUT`` from when a thread starts it; past that its job ends as
``too_complex``. A thread stuck in C cannot be stopped, so it is replaced (up to ``max_extra`` extra threads)
and retires when it finishes if the pool has enough threads without it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from imgq.errors import ErrorCode, ItemError

log = logging.getLogger(__name__)

Prepared = torch.Tensor | ItemError


class DecodeJob(Future[Prepared]):
    """A future with the moment a decode thread started on it (None while it waits for one)."""

    def __init__(self, fn: Callable[[], Prepared]) -> None:
        super().__init__()
        self.fn = fn
        self.started: float | None = None
        self.stuck = False  # ran past the timeout; its thread is still in it


def _settle(job: Future[Prepared], result: Prepared) -> None:
    # First wins: the watchdog may already have ended the job as too_complex, or a caller cancelled it.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        job.set_result(result)


class DecodePool:
    """Decode threads with a time bound per job, counted from when a thread starts it.

    A job still running ``timeout_s`` after it started is ended as ``too_complex`` by a watchdog thread; its
    thread cannot be stopped (Pillow is in C, without the GIL) and runs on until libjpeg is done. So that one
    such image cannot starve the pool for later batches, a stuck thread is replaced at once, up to
    ``max_extra`` threads over ``threads``; a stuck thread that finishes retires if the pool has enough
    without it. Past that cap the pool decodes with fewer threads until the stuck ones finish (logged): the
    cap bounds what stuck decodes hold, a core and up to an image's pixels each, and IMGQ_MAX_JPEG_SCANS
    bounds how long one can be stuck. Threads are daemons, so a stuck decode never delays process exit.
    """

    def __init__(self, threads: int, *, timeout_s: float, max_extra: int, name: str = "imgq-decode") -> None:
        self._base = threads
        self._max_threads = threads + max_extra
        self._timeout_s = timeout_s
        self._name = name
        self._jobs: queue.SimpleQueue[DecodeJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job started, or the pool closes
        self._running: set[DecodeJob] = set()
        self._threads = 0
        self._stuck = 0
        self._stuck_total = 0
        self._closed = False
        self._watch_idle = True  # the watchdog waits for a job to start, with no due time to wake at
        self._serial = 0
        with self._lock:
            for _ in range(threads):
                self._spawn()
        threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True).start()

    def submit(self, fn: Callable[[], Prepared]) -> DecodeJob:
        job = DecodeJob(fn)
        self._jobs.put(job)
        return job

    @property
    def threads(self) -> int:
        """Decode threads alive now, stuck ones included."""
        with self._lock:
            return self._threads

    @property
    def stuck(self) -> int:
        """Threads still in a decode that ran past the timeout."""
        with self._lock:
            return self._stuck

    @property
    def stuck_total(self) -> int:
        """Decodes ended as too_complex by the timeout since the pool started."""
        with self._lock:
            return self._stuck_total

    def shutdown(self) -> None:
        """Stop taking jobs; queued ones are cancelled, running ones are left to finish (daemon threads)."""
        with self._lock:
            self._closed = True
            threads = self._threads
            self._changed.notify_all()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        for _ in range(threads):
            self._jobs.put(None)

    def _spawn(self) -> None:  # with the lock held
        self._threads += 1
        self._serial += 1
        threading.Thread(target=self._work, name=f"{self._name}_{self._serial}", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not job.set_running_or_notify_cancel():
                continue  # its batch gave up on it before a thread was free
            with self._lock:
                job.started = time.monotonic()
                self._running.add(job)
                if self._watch_idle:  # else it already sleeps until an earlier job's due time
                    self._watch_idle = False
                    self._changed.notify()
            try:
                result = job.fn()
            except Exception as exc:  # fn maps bad input to ItemError; anything else is a bug
                log.exception("decode job failed")
                result = ItemError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._running.discard(job)
                if job.stuck:
                    self._stuck -= 1
                retire = self._threads - self._stuck > self._base or self._closed
                if retire:
                    self._threads -= 1
            _settle(job, result)
            if job.stuck:
                log.warning("imgq decode: an image given up as too_complex finished decoding after %.1f s; "
                            "%d decode thread(s) still stuck", time.monotonic() - (job.started or 0.0), self.stuck)
            if retire:
                return

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                late = [j for j in self._running if not j.stuck and (j.started or now) + self._timeout_s <= now]
                for job in late:
                    job.stuck = True
                self._stuck += len(late)
                self._stuck_total += len(late)
                while late and self._threads - self._stuck < self._base and self._threads < self._max_threads:
                    self._spawn()
                threads, stuck = self._threads, self._stuck
                dues = [(j.started or now) + self._timeout_s for j in self._running if not j.stuck]
                if not late:
                    self._watch_idle = not dues
                    self._changed.wait(timeout=max(0.0, min(dues) - now) if dues else None)
                    continue
            message = f"decoding took longer than IMGQ_DECODE_TIMEOUT={self._timeout_s:g}s"
            for job in late:
                _settle(job, ItemError(ErrorCode.TOO_COMPLEX, message))
            level = logging.ERROR if threads - stuck < self._base else logging.WARNING
            log.log(level, "imgq decode: %d image(s) still decoding after %g s (IMGQ_DECODE_TIMEOUT), given up "
                    "as too_complex; %d decode thread(s) stuck, %d running (base %d, at most %d)%s", len(late),
                    self._timeout_s, stuck, threads, self._base, self._max_threads,
                    "; the pool is at its cap and decodes with fewer threads until they finish"
                    if threads - stuck < self._base else "")
