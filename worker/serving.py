"""The per-process serving state: the model, a fetch event loop, a decode pool and the batcher.

Built lazily in the process that serves tasks (never in a parent that forks), once, and shared by the
pool's threads. Stages overlap: while one task's batch is in the model, others are fetching and decoding.

Time: :meth:`Serving.fetch_prepare` takes the batch's deadline (the pipeline's start + IMGQ_TASK_TIME_LIMIT).
Fetches still running ``IMGQ_DECODE_TIMEOUT`` before it are cancelled (``timeout``), so the bodies already
fetched have that long to decode; nothing waits past the deadline. One image may decode for at most
``IMGQ_DECODE_TIMEOUT`` from when a decode thread started it (``too_complex``); see
:class:`worker.decode_pool.DecodePool` for what happens to the thread, which cannot be stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence

import torch

from imgq import redis_conn
from imgq.errors import ErrorCode, ItemError, SettingsError
from imgq.settings import Settings
from model.champion import Champion
from model.classifier import Classifier, Prediction, ServingOptions, configure_serving, resolve_device
from worker import cores, metrics
from worker.batcher import Batcher
from worker.decode import prepare_image
from worker.decode_pool import DecodeJob, DecodePool, Prepared
from worker.fetch import Fetcher
from worker.gpu_decode import GpuDecoder
from worker.malloc import configure_malloc
from worker.model_watch import ModelWatcher

log = logging.getLogger(__name__)

def _jpeg(width: int, height: int) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.new("RGB", (width, height), (128, 96, 64)).save(out, format="JPEG")
    return out.getvalue()


_WARM_UP_JPEG = _jpeg(96, 72)

# A placeholder fetch_many always overwrites (it calls back once per URL before it returns).
_NOT_FETCHED = ItemError(ErrorCode.INTERNAL, "not fetched")


class Serving:
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
        configure_serving(ServingOptions(amp=settings.amp, compile=settings.compile, optimize=settings.optimize))
        self.redis = redis_conn.connect(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
        self._models = ModelWatcher(Champion(settings.model_dir, self.redis), self.device,
                                    check_every_s=settings.reload_check_s, warm_up=self.warm_model)
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
        self.warm_up()

    def warm_up(self) -> None:
        """Decode one small JPEG and warm the model up (:meth:`warm_model`) before the first batch arrives:
        so the first batch is as fast as the hundredth and a model that cannot run fails here, at start-up."""
        started = time.monotonic()
        self.warm_model(self.model)  # decodes its input: that warms the decoder
        log.info("imgq engine: warmed up in %.2f s", time.monotonic() - started)

    def warm_model(self, model: Classifier) -> None:
        """The forward pass at the batch sizes serving uses, twice each: the first calls allocate and pick
        kernels, and a frozen TorchScript graph optimises itself on its second (64 rows: 65, 45, then 31 ms).
        Also run on every hot-reloaded model before a batch sees it."""
        image = prepare_image(_WARM_UP_JPEG, model, self.settings)
        for rows in sorted({1, self.settings.infer_batch}):  # past the batcher: its metrics count real rows only
            for _ in range(2):
                model.predict(torch.stack([image] * rows), self.settings.topk)

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


_serving: Serving | None = None
_serving_lock = threading.Lock()


def get_serving(settings: Settings) -> Serving:
    """This process's serving state, built on first use (in the process that serves, never a forking parent)."""
    global _serving
    with _serving_lock:
        if _serving is None:
            _serving = Serving(settings)
        return _serving


def close_serving() -> None:
    global _serving
    with _serving_lock:
        if _serving is not None:
            _serving.close()
            _serving = None
