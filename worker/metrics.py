"""Prometheus metrics of one worker process, served over HTTP on ``IMGQ_METRICS_PORT`` (0 = off).

    imgq_images_total{outcome}          items this process finished: ``labelled`` or ``error``
    imgq_item_errors_total{code}        failed items by error code (imgq/errors.py)
    imgq_stage_seconds{stage}           per batch: ``fetch`` (to the last body; decoding starts on each body
                                        as it arrives), ``decode`` (and preprocess, what is left after the
                                        last body), ``infer`` (batcher wait included), ``write`` (the one Lua call)
    imgq_forward_batch_size             rows per forward pass, after the dynamic batcher merged tasks
    imgq_queue_wait_seconds{task}       enqueue (producer's clock) to task start (worker's clock)
    imgq_model_info{version,device}     the model this process serves
    imgq_worker_info{node,cuda_visible_devices,pid}   who this process is (GPU pinning shows here)

One registry and port per process needs no multiprocess mode: Celery's threads pool keeps a worker's tasks
in one process, and `imgq worker --gpus/--processes` gives child i the port + i.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Histogram, Info, start_http_server

from imgq.celery_app import ENQUEUED_HEADER

log = logging.getLogger(__name__)

# The message header the producer stamps (before_task_publish) and the worker reads (task_prerun).

# Seconds: a cached image fetches in milliseconds, IMGQ_FETCH_TIMEOUT defaults to 15 s.
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A backlog can hold a batch for hours; the interesting part is "milliseconds" vs "minutes".
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

IMAGES = Counter("imgq_images", "Items finished by this worker process", ["outcome"])
ERRORS = Counter("imgq_item_errors", "Failed items by error code", ["code"])
STAGE_SECONDS = Histogram("imgq_stage_seconds", "Per-batch latency of a pipeline stage", ["stage"],
                          buckets=_STAGE_BUCKETS)
FORWARD_BATCH = Histogram("imgq_forward_batch_size", "Rows per forward pass", buckets=_BATCH_BUCKETS)
QUEUE_WAIT = Histogram("imgq_queue_wait_seconds", "From enqueue to task start", ["task"], buckets=_WAIT_BUCKETS)
MODEL = Info("imgq_model", "The model this worker process serves")
WORKER = Info("imgq_worker", "This worker process")

_started = False
_model: tuple[str, str] | None = None
_lock = threading.Lock()


def start_server(port: int, *, node: str) -> bool:
    """Serve /metrics on all interfaces (a Prometheus elsewhere scrapes it); False when off or taken.

    A taken port is logged, not fatal: classifying matters more than being watched.
    """
    global _started
    WORKER.info({"node": node, "pid": str(os.getpid()),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")})
    with _lock:
        if port == 0 or _started:
            return _started
        try:
            start_http_server(port)
        except OSError as exc:
            log.error("imgq metrics: cannot listen on port %d (IMGQ_METRICS_PORT): %s; serving without metrics",
                      port, exc)
            return False
        _started = True
    log.info("imgq metrics on :%d/metrics", port)
    return True


@contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(name).observe(time.perf_counter() - start)


def count_results(records: Iterable[Mapping[str, Any]]) -> None:
    codes = Tally(r["error"]["code"] for r in records if r["error"])
    labelled = sum(1 for r in records if not r["error"])
    if labelled:
        IMAGES.labels("labelled").inc(labelled)
    for code, n in codes.items():
        IMAGES.labels("error").inc(n)
        ERRORS.labels(code).inc(n)


def count_errors(code: str, n: int) -> None:
    if n:
        IMAGES.labels("error").inc(n)
        ERRORS.labels(code).inc(n)


def observe_forward_batch(rows: int) -> None:
    FORWARD_BATCH.observe(rows)


def set_model(version: str, device: object) -> None:
    """Called per batch: cheap when nothing changed, and follows a hot-reloaded champion."""
    global _model
    current = (version, str(device))
    if current != _model:
        _model = current
        MODEL.info({"version": version, "device": str(device)})


def observe_queue_wait(task_name: str, request: Any) -> None:
    # Custom message headers become attributes of the task's request context.
    enqueued = getattr(request, ENQUEUED_HEADER, None)
    if isinstance(enqueued, int | float):
        # Producer and worker clocks differ across hosts: never report a negative wait.
        QUEUE_WAIT.labels(task_name).observe(max(0.0, time.time() - enqueued))
