"""The Celery app both sides share: task names, routes and delivery settings. Builds nothing at import.

Producers call :func:`create_app` to send; the worker (worker.app) builds one from the environment and adds
its signal handlers. Delivery settings follow ../shared/RELIABILITY.md: late acks with reject-on-worker-lost
so a dead worker's batch is delivered again, prefetch of one so a dead worker held at most one extra batch,
and one visibility-timeout setting feeding every transport option that needs it (celery#7651).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, signals

from imgq.redis_conn import broker_options
from imgq.settings import Settings

CLASSIFY_TASK = "imgq.classify"
RETRAIN_TASK = "imgq.retrain"
# A message header with the time it was sent: the worker's queue-wait metric reads it.
ENQUEUED_HEADER = "imgq_enqueued_at"


def _stamp_enqueue_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers.setdefault(ENQUEUED_HEADER, time.time())


def create_app(settings: Settings) -> Celery:
    # Connected once per process (dispatch_uid), by whichever side builds an app first.
    signals.before_task_publish.connect(_stamp_enqueue_time, weak=False, dispatch_uid="imgq-stamp-enqueue-time")
    broker, sentinel = broker_options(settings.redis_url)
    app = Celery("imgq", broker=broker, include=["worker.tasks"])
    vt = settings.visibility_timeout_s
    transport = {
        "visibility_timeout": vt,
        # kombu sweeps for expired unacked messages every interval x throttle s (100 s by default): make the
        # sweep a fraction of the visibility timeout so a dead worker's batch returns within ~1.2 x vt.
        "unacked_restore_interval": max(1.0, min(10.0, vt / 5)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": int(max(5.0, min(300.0, vt))),
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
        # No retry_on_timeout: it makes redis-py retry inside kombu's reads, and a retry reconnects. A worker that
        # reads its pub/sub socket after a restarted Redis is back then resubscribes quietly and blocks on a
        # socket no message will come to, its event loop stopped (tests/test_faults.py, the frozen worker).
        # Without it the error reaches kombu, and Celery reconnects everything; publishes retry below.
        "socket_keepalive": True,
        "health_check_interval": 25,
        **sentinel,  # sentinel:// URLs: the master's name (imgq.redis_conn)
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results go to imgq's own keys (imgq.jobs), not a result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=settings.task_time_limit_s,
        worker_prefetch_multiplier=1,
        # A threads pool keeps one model and one batcher per process and lets tasks overlap their fetches;
        # the model is never loaded in a parent that forks.
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        # The threads pool cannot cancel a running task: asking logs a NotImplementedError per batch on every
        # Redis blip. The batch runs on and writes first-wins; its message, restored by kombu, finds it done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A send rides out a Redis restart of ~10 s (Celery's default gives up after ~0.6 s): waits of 0, 0.5,
        # 1, 1.5 and then 2 s, reconnecting each time.
        task_publish_retry_policy={"max_retries": 8, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        task_default_queue=settings.classify_queue,
        task_routes={CLASSIFY_TASK: {"queue": settings.classify_queue},
                     RETRAIN_TASK: {"queue": settings.train_queue}},
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
    )
    app.imgq_settings = settings  # type: ignore[attr-defined]
    return app


def app_settings(celery_app: Celery) -> Settings:
    """The settings an app was built with."""
    settings: Settings = celery_app.imgq_settings  # type: ignore[attr-defined]
    return settings
