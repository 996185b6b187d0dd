"""Prometheus metrics of one worker process, served over HTTP on ``IMGQ_METRICS_ADDR``:``IMGQ_METRICS_PORT``
(port 0 = off). docs/operating.md says what each means to an operator and which alerts use it.

    imgq_images_total{outcome}          items this process finished: ``labelled`` or ``error``
    imgq_item_errors_total{code}        failed items by error code (imgq/errors.py)
    imgq_fetch_retries_total{reason}    fetch attempts made again after a transient failure, by reason
    imgq_item_latency_seconds           per item: enqueue (producer's clock) to its result written (worker's clock)
    imgq_stage_seconds{stage}           per batch: ``fetch`` (to the last body; decoding starts on each body
                                        as it arrives), ``decode`` (and preprocess, what is left after the
                                        last body), ``infer`` (batcher wait included), ``write`` (the one Lua call)
    imgq_forward_batch_size             rows per forward pass, after the dynamic batcher merged tasks
    imgq_queue_wait_seconds{task}       enqueue (producer's clock) to task start (worker's clock)
    imgq_batches_in_flight              classify batches this process is working on now
    imgq_worker_ready                   1 once the worker serves (engine built, consumer up); 0 when stopping
    imgq_model_load_failures_total      champions this process refused to load on hot reload (kept the old one)
    imgq_retrains_total{outcome}        retrain runs of this trainer: promoted, rejected (held back by the
                                        gate), failed, skipped (another run held the lock)
    imgq_model_info{version,device}     the model this process serves
    imgq_worker_info{node,cuda_visible_devices,pid}   who this process is (GPU pinning shows here)

Read from Redis at scrape time (the same in every process: aggregate with max, not sum):

    imgq_queue_depth{queue}             messages (batches) waiting in the classify and train queues
    imgq_queue_oldest_age_seconds{queue}  age of the next message to be delivered (0 when the queue is empty)
    imgq_champion_info{version}         the champion pointer in Redis (absent while Redis has none)
    imgq_redis_up                       1 when this scrape read Redis, 0 when it failed within IMGQ_REDIS_TIMEOUT

One registry and port per process needs no multiprocess mode: Celery's threads pool keeps a worker's tasks
in one process, and `imgq worker --gpus/--processes` gives child i the port + i.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from imgq import keys
from imgq.celery_app import ENQUEUED_HEADER
from imgq.errors import ErrorCode
from imgq.jobs import JobStore
from imgq.settings import Settings

log = logging.getLogger(__name__)

# Seconds: a cached image fetches in milliseconds, IMGQ_FETCH_TIMEOUT defaults to 15 s.
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A backlog can hold a batch for hours; the interesting part is "milliseconds" vs "minutes".
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RETRAIN_OUTCOMES = ("promoted", "rejected", "failed", "skipped")

IMAGES = Counter("imgq_images", "Items finished by this worker process", ["outcome"])
ERRORS = Counter("imgq_item_errors", "Failed items by error code", ["code"])
FETCH_RETRIES = Counter("imgq_fetch_retries", "Fetch attempts made again after a transient failure", ["reason"])
ITEM_LATENCY = Histogram("imgq_item_latency_seconds", "Per item, from enqueue to its result written",
                         buckets=_WAIT_BUCKETS)
STAGE_SECONDS = Histogram("imgq_stage_seconds", "Per-batch latency of a pipeline stage", ["stage"],
                          buckets=_STAGE_BUCKETS)
FORWARD_BATCH = Histogram("imgq_forward_batch_size", "Rows per forward pass", buckets=_BATCH_BUCKETS)
QUEUE_WAIT = Histogram("imgq_queue_wait_seconds", "From enqueue to task start", ["task"], buckets=_WAIT_BUCKETS)
IN_FLIGHT = Gauge("imgq_batches_in_flight", "Classify batches this worker process is working on")
READY = Gauge("imgq_worker_ready", "1 while this worker process serves: engine built and consumer up")
MODEL_LOAD_FAILURES = Counter("imgq_model_load_failures", "Champion models this process refused to load on reload")
RETRAINS = Counter("imgq_retrains", "Retrain runs by outcome", ["outcome"])
MODEL = Info("imgq_model", "The model this worker process serves")
WORKER = Info("imgq_worker", "This worker process")


def _declare_known_labels() -> None:
    # Series whose label values are known in advance exist from the start, at 0: Prometheus' rate() and
    # increase() cannot see the first rise of a series that first appears already at 1 (a first failure).
    for outcome in ("labelled", "error"):
        IMAGES.labels(outcome)
    for code in ErrorCode:
        ERRORS.labels(code.value)
    for outcome in RETRAIN_OUTCOMES:
        RETRAINS.labels(outcome)


_declare_known_labels()

_started: str | None = None  # the URL /metrics is served on
_model: tuple[str, str] | None = None
_lock = threading.Lock()


class RedisCollector(Collector):
    """Queue depths, the oldest message's age and the champion pointer, read from Redis at scrape time.

    One pipelined round trip on a client that gives up within IMGQ_REDIS_TIMEOUT: a Redis that is down or
    silent makes the scrape report ``imgq_redis_up 0`` instead of hanging it.
    """

    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        self.r = client
        self.queues = tuple(queues)
        self._warned = False

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not touch Redis.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        depth, oldest, champion, up = self._families()
        try:
            with self.r.pipeline(transaction=False) as p:
                for q in self.queues:
                    p.llen(q)
                    p.lindex(q, -1)  # kombu LPUSHes and BRPOPs: the tail is delivered next
                p.get(keys.CHAMPION)
                *rows, pointer = p.execute()
        except redis.RedisError as exc:
            if not self._warned:  # once per outage, not once per scrape
                log.warning("imgq metrics: cannot read Redis for queue metrics (%s: %s)", type(exc).__name__, exc)
                self._warned = True
            up.add_metric([], 0)
            return [up]
        self._warned = False
        now = time.time()
        for q, length, tail in zip(self.queues, rows[::2], rows[1::2], strict=True):
            depth.add_metric([q], int(length))
            oldest.add_metric([q], _age(tail, now))
        if pointer is not None:
            champion.add_metric([pointer.decode() if isinstance(pointer, bytes) else str(pointer)], 1)
        up.add_metric([], 1)
        return [depth, oldest, champion, up]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("imgq_queue_depth", "Messages (batches) waiting in a queue", labels=["queue"]),
            GaugeMetricFamily("imgq_queue_oldest_age_seconds",
                              "Seconds since the next message to be delivered was enqueued (0: empty queue)",
                              labels=["queue"]),
            GaugeMetricFamily("imgq_champion_info", "The champion model version in Redis", labels=["version"]),
            GaugeMetricFamily("imgq_redis_up", "1 when this scrape could read Redis"),
        ]


def _age(raw: bytes | str | None, now: float) -> float:
    """Seconds since the kombu message ``raw`` was stamped; 0 for no message, or one without a stamp."""
    if raw is None:
        return 0.0
    try:
        stamp = json.loads(raw).get("headers", {}).get(ENQUEUED_HEADER)
    except (ValueError, AttributeError):  # not a kombu message: nothing to say about its age
        return 0.0
    return max(0.0, now - stamp) if isinstance(stamp, int | float) else 0.0


def metrics_url(addr: str, port: int) -> str:
    host = f"[{addr}]" if ipaddress.ip_address(addr).version == 6 else addr
    return f"http://{host}:{port}/metrics"


def start_server(settings: Settings, *, node: str) -> str | None:
    """Serve /metrics on IMGQ_METRICS_ADDR:IMGQ_METRICS_PORT; returns its URL, None when off or taken.

    A taken port is logged, not fatal: classifying matters more than being watched.
    """
    global _started
    WORKER.info({"node": node, "pid": str(os.getpid()),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")})
    port, addr = settings.metrics_port, settings.metrics_addr
    with _lock:
        if port == 0 or _started:
            return _started
        client = JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s, timeout_s=settings.redis_timeout_s).r
        collector = RedisCollector(client, [settings.classify_queue, settings.train_queue])
        REGISTRY.register(collector)
        try:
            start_http_server(port, addr=addr)
        except OSError as exc:
            REGISTRY.unregister(collector)
            log.error("imgq metrics: cannot listen on %s port %d (IMGQ_METRICS_ADDR, IMGQ_METRICS_PORT): %s; "
                      "serving without metrics", addr, port, exc)
            return None
        _started = metrics_url(addr, port)
    return _started


def address() -> str | None:
    """The URL /metrics is served on, once :func:`start_server` succeeded."""
    return _started


def set_ready(ready: bool) -> None:
    READY.set(1 if ready else 0)


@contextmanager
def stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(name).observe(time.perf_counter() - start)


@contextmanager
def batch_in_flight() -> Iterator[None]:
    with IN_FLIGHT.track_inprogress():
        yield


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


def count_fetch_retries(reason: str, n: int = 1) -> None:
    if n:
        FETCH_RETRIES.labels(reason).inc(n)


def count_model_load_failure() -> None:
    MODEL_LOAD_FAILURES.inc()


def count_retrain(outcome: Mapping[str, Any]) -> str:
    """Count a retrain's final event (model.retrain.run_retrain's result); returns the outcome counted."""
    event = outcome.get("event")
    name = ("promoted" if outcome.get("promoted") else "rejected") if event == "done" else str(event)
    if name not in RETRAIN_OUTCOMES:
        name = "failed"  # an event this module does not know is not a success
    RETRAINS.labels(name).inc()
    return name


def observe_forward_batch(rows: int) -> None:
    FORWARD_BATCH.observe(rows)


def set_model(version: str, device: object) -> None:
    """Called per batch: cheap when nothing changed, and follows a hot-reloaded champion."""
    global _model
    current = (version, str(device))
    if current != _model:
        _model = current
        MODEL.info({"version": version, "device": str(device)})


def _enqueued_at(request: Any) -> float | None:
    # Custom message headers become attributes of the task's request context.
    enqueued = getattr(request, ENQUEUED_HEADER, None)
    return float(enqueued) if isinstance(enqueued, int | float) else None


def observe_queue_wait(task_name: str, request: Any) -> None:
    enqueued = _enqueued_at(request)
    if enqueued is not None:
        # Producer and worker clocks differ across hosts: never report a negative wait.
        QUEUE_WAIT.labels(task_name).observe(max(0.0, time.time() - enqueued))


def observe_item_latency(request: Any, items: int) -> None:
    """``items`` results of the message ``request`` were just written: each waited since its enqueue."""
    enqueued = _enqueued_at(request)
    if enqueued is not None:
        latency = max(0.0, time.time() - enqueued)
        for _ in range(items):  # a histogram counts observations: one per item, not per batch
            ITEM_LATENCY.observe(latency)
