"""Per-process serving state: the model, a fetch event loop, a decode pool and the batcher.

Built lazily in the process that serves tasks (never in a parent that forks), once, and shared by the
pool's threads. Stages overlap: while one task's batch is in the model, others are fetching and decoding.

Time: :meth:`Engine.fetch_prepare` takes the batch's deadline (the pipeline's start + IMGQ_TASK_TIME_LIMIT).
Fetches still running ``IMGQ_DECODE_TIMEOUT`` before it are cancelled (``timeout``), so the bodies already
fetched have that long to decode; nothing waits past the deadline. One image may decode for at most
``IMGQ_DECODE_TIMEOUT`` from when a decode thread started it (``too_complex``); see :class:`DecodePool` for
what happens to the thread, which cannot be stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import redis
import torch

from imgq.champion import Champion
from imgq.errors import ErrorCode, ItemError, SettingsError
from imgq.settings import Settings
from model import Classifier, resolve_device
from model.classifier import ServingOptions, configure_serving
from worker import cores, metrics
from worker.batcher import Batcher, Prediction
from worker.decode import decode_image
from worker.fetch import Fetcher
from worker.gpu_decode import GpuDecoder
from worker.malloc import configure_malloc
from worker.model_watch import ModelWatcher

log = logging.getLogger(__name__)

Prepared = torch.Tensor | ItemError

# A placeholder fetch_many always overwrites (it calls back once per URL before it returns).
_NOT_FETCHED = ItemError(ErrorCode.INTERNAL, "not fetched")


def prepare_image(body: bytes, model: Classifier, settings: Settings) -> torch.Tensor:
    """Untrusted bytes -> the model's input tensor (ItemError for bad input): the per-image work of serving,
    which the benchmark's ceiling runs too."""
    image = decode_image(body, max_pixels=settings.max_pixels, formats=settings.image_formats,
                         draft_size=model.preprocess.size, max_jpeg_scans=settings.max_jpeg_scans)
    return model.preprocess(image)


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


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError("IMGQ_DEVICE=cuda but torch sees no CUDA device; use auto or cpu")
        configure_malloc(settings.malloc_arenas)  # before this engine starts its threads
        threads = cores.torch_threads(settings, self.device)
        if threads:
            torch.set_num_threads(threads)
        # Before any model loads: hot-reloaded models get the same options.
        configure_serving(ServingOptions(amp=settings.amp, compile=settings.compile))
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
        self._models = ModelWatcher(Champion(settings.model_dir, self.redis), self.device,
                                    check_every_s=settings.reload_check_s)
        log.info("imgq engine: model %s on %s", self.model.version, self.device)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="imgq-fetch", daemon=True)
        self._loop_thread.start()
        self._fetcher = Fetcher(settings)
        asyncio.run_coroutine_threadsafe(self._fetcher.__aenter__(), self._loop).result()
        # Pillow releases the GIL while decoding, so threads decode in parallel. Up to as many again may be
        # added while decodes are stuck past IMGQ_DECODE_TIMEOUT (DecodePool).
        decode_threads = cores.decode_threads(settings)
        self._decode_pool = DecodePool(decode_threads, timeout_s=settings.decode_timeout_s,
                                       max_extra=decode_threads)
        self._batcher = Batcher(max_batch=settings.infer_batch, max_wait_s=settings.infer_wait_ms / 1000,
                                runners=cores.infer_threads(settings, self.device))
        self._gpu_decoder: GpuDecoder | None = None
        if settings.gpu_decode and self.device.type == "cuda":
            self._gpu_decoder = GpuDecoder(settings, self.device)
        elif settings.gpu_decode:
            log.warning("IMGQ_GPU_DECODE is on but the device is %s: decoding with Pillow", self.device)

    @property
    def model(self) -> Classifier:
        """The champion now; a batch reads this once so it never mixes versions."""
        return self._models.current()

    def fetch(self, urls: Sequence[str], *, deadline: float | None = None) -> list[bytes | ItemError]:
        future = asyncio.run_coroutine_threadsafe(self._fetcher.fetch_many(urls, deadline=deadline), self._loop)
        return future.result()

    def fetch_prepare(self, urls: Sequence[str], model: Classifier, *,
                      deadline: float | None = None) -> list[Prepared]:
        """Fetch, decode and preprocess: one tensor or ItemError per URL, in order, by ``deadline``.

        ``deadline`` (a ``time.monotonic()`` instant, None for no bound) is the end of the batch's time budget.
        Fetches still running ``IMGQ_DECODE_TIMEOUT`` before it end as ``timeout``; an image not decoded by it
        ends as ``timeout`` too, and one whose own decode passed ``IMGQ_DECODE_TIMEOUT`` as ``too_complex``.

        On CPU each body goes to the decode pool as soon as it arrives, so a batch's decoding overlaps its own
        slower downloads and the pool is never starved between batches.
        Metrics: ``fetch`` is until the last body arrived, ``decode`` the decoding still left after that.
        """
        fetch_deadline = None if deadline is None else deadline - self.settings.decode_timeout_s
        if self._gpu_decoder is not None:  # decodes a whole batch's JPEGs at once on the GPU, the rest with Pillow
            with metrics.stage("fetch"):
                bodies = self.fetch(urls, deadline=fetch_deadline)
            with metrics.stage("decode"):
                return self._gpu_decoder.prepare(bodies, model,
                                                 fallback=lambda rest: self._cpu_prepare(rest, model, deadline))
        pending: list[DecodeJob | ItemError] = [_NOT_FETCHED] * len(urls)

        def decode_later(i: int, body: bytes | ItemError) -> None:  # on the event loop: must not block
            pending[i] = body if isinstance(body, ItemError) else self._submit(body, model)

        with metrics.stage("fetch"):
            fetched = self._fetcher.fetch_many(urls, on_result=decode_later, deadline=fetch_deadline)
            asyncio.run_coroutine_threadsafe(fetched, self._loop).result()
        with metrics.stage("decode"):
            return self._collect(pending, deadline)

    def _cpu_prepare(self, bodies: Sequence[bytes | ItemError], model: Classifier,
                     deadline: float | None) -> list[Prepared]:
        jobs = [body if isinstance(body, ItemError) else self._submit(body, model) for body in bodies]
        return self._collect(jobs, deadline)

    def _submit(self, body: bytes, model: Classifier) -> DecodeJob:
        return self._decode_pool.submit(lambda: self._prepare_one(body, model))

    def _collect(self, pending: Sequence[DecodeJob | ItemError], deadline: float | None) -> list[Prepared]:
        """Each job's result, waiting no later than ``deadline``; the pool's watchdog ends each started job
        within IMGQ_DECODE_TIMEOUT, so without a deadline this waits at most for the queue ahead of it."""
        jobs = [p for p in pending if isinstance(p, DecodeJob)]
        concurrent.futures.wait(jobs, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        out: list[Prepared] = []
        for item in pending:
            if isinstance(item, ItemError):
                out.append(item)
                continue
            item.cancel()  # not started yet: no thread will spend time on it (no-op once running or done)
            if item.done() and not item.cancelled():
                out.append(item.result())
            else:
                out.append(self._out_of_time(item))
        return out

    def _out_of_time(self, job: DecodeJob) -> ItemError:
        started = job.started
        where = ("it was waiting for a decode thread" if started is None
                 else f"its decode had run {time.monotonic() - started:.1f} s")
        return ItemError(
            ErrorCode.TIMEOUT,
            f"the batch's time budget (IMGQ_TASK_TIME_LIMIT={self.settings.task_time_limit_s:g}s) ran out before "
            f"this image was decoded: {where}",
        )

    def _prepare_one(self, body: bytes, model: Classifier) -> Prepared:
        try:
            return prepare_image(body, model, self.settings)
        except ItemError as err:
            return err
        except Exception as exc:  # a bug, not bad input: still one result for the item
            log.exception("preprocess failed")
            return ItemError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    @property
    def decode_pool(self) -> DecodePool:
        return self._decode_pool

    def predict(self, model: Classifier, tensors: Sequence[torch.Tensor]) -> list[Prediction]:
        return self._batcher.predict(model, tensors, self.settings.topk)

    def close(self) -> None:
        self._batcher.close()
        self._decode_pool.shutdown()
        asyncio.run_coroutine_threadsafe(self._fetcher.__aexit__(None, None, None), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
        self.redis.close()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            from worker.app import app_settings

            _engine = Engine(settings or app_settings())
        return _engine


def close_engine() -> None:
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.close()
            _engine = None
