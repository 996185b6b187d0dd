"""Per-process serving state: the model, a fetch event loop, a decode pool and the batcher.

Built lazily in the process that serves tasks (never in a parent that forks), once, and shared by the
pool's threads. Stages overlap: while one task's batch is in the model, others are fetching and decoding.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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

# A placeholder fetch_many always overwrites (it calls back once per URL before it returns).
_NOT_FETCHED = ItemError(ErrorCode.INTERNAL, "not fetched")


def prepare_image(body: bytes, model: Classifier, settings: Settings) -> torch.Tensor:
    """Untrusted bytes -> the model's input tensor (ItemError for bad input): the per-image work of serving,
    which the benchmark's ceiling runs too."""
    image = decode_image(body, max_pixels=settings.max_pixels, formats=settings.image_formats,
                         draft_size=model.preprocess.size)
    return model.preprocess(image)


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
        # Pillow releases the GIL while decoding, so threads decode in parallel.
        self._decode_pool = ThreadPoolExecutor(max_workers=cores.decode_threads(settings),
                                               thread_name_prefix="imgq-decode")
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

    def fetch(self, urls: Sequence[str]) -> list[bytes | ItemError]:
        future = asyncio.run_coroutine_threadsafe(self._fetcher.fetch_many(urls), self._loop)
        return future.result()

    def fetch_prepare(self, urls: Sequence[str], model: Classifier) -> list[torch.Tensor | ItemError]:
        """Fetch, decode and preprocess. On CPU each body goes to the decode pool as soon as it arrives, so a
        batch's decoding overlaps its own slower downloads and the pool is never starved between batches.

        Metrics: ``fetch`` is until the last body arrived, ``decode`` the decoding still left after that.
        """
        if self._gpu_decoder is not None:  # decodes a whole batch's JPEGs at once on the GPU, the rest with Pillow
            with metrics.stage("fetch"):
                bodies = self.fetch(urls)
            with metrics.stage("decode"):
                return self._gpu_decoder.prepare(bodies, model,
                                                 fallback=lambda rest: self._cpu_prepare(rest, model))
        pending: list[Future[torch.Tensor | ItemError] | ItemError] = [_NOT_FETCHED] * len(urls)

        def decode_later(i: int, body: bytes | ItemError) -> None:  # on the event loop: must not block
            pending[i] = body if isinstance(body, ItemError) else self._decode_pool.submit(self._prepare_one,
                                                                                             body, model)

        with metrics.stage("fetch"):
            fetched = self._fetcher.fetch_many(urls, on_result=decode_later)
            asyncio.run_coroutine_threadsafe(fetched, self._loop).result()
        with metrics.stage("decode"):
            return [p if isinstance(p, ItemError) else p.result() for p in pending]

    def _cpu_prepare(self, bodies: Sequence[bytes | ItemError], model: Classifier) -> list[torch.Tensor | ItemError]:
        return list(self._decode_pool.map(lambda body: self._prepare_one(body, model), bodies))

    def _prepare_one(self, body: bytes | ItemError, model: Classifier) -> torch.Tensor | ItemError:
        if isinstance(body, ItemError):
            return body
        try:
            return prepare_image(body, model, self.settings)
        except ItemError as err:
            return err
        except Exception as exc:  # a bug, not bad input: still one result for the item
            log.exception("preprocess failed")
            return ItemError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def predict(self, model: Classifier, tensors: Sequence[torch.Tensor]) -> list[Prediction]:
        return self._batcher.predict(model, tensors, self.settings.topk)

    def close(self) -> None:
        self._batcher.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
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
