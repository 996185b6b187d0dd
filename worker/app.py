"""The Celery app: `celery -A worker.app ...` and `imgq worker` both use it.

Delivery settings follow ../shared/RELIABILITY.md: late acks with reject-on-worker-lost so a dead
worker's batch is delivered again, prefetch of one so a dead worker held at most one extra batch, and one
visibility-timeout setting feeding every transport option that needs it (celery#7651).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, signals

from imgq.settings import Settings
from worker import metrics

CLASSIFY_TASK = "imgq.classify"
RETRAIN_TASK = "imgq.retrain"

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    app = Celery("imgq", broker=settings.redis_url, include=["worker.tasks"])
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
        # Ride out a Redis restart instead of dying with the connection.
        "retry_on_timeout": True,
        "socket_keepalive": True,
        "health_check_interval": 25,
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
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=settings.classify_queue,
        task_routes={CLASSIFY_TASK: {"queue": settings.classify_queue},
                     RETRAIN_TASK: {"queue": settings.train_queue}},
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
    )
    app.imgq_settings = settings  # type: ignore[attr-defined]
    return app


app = create_app(Settings.from_env())


def app_settings(celery_app: Celery = app) -> Settings:
    settings: Settings = celery_app.imgq_settings  # type: ignore[attr-defined]
    return settings


def _serves_classify(sender: Any) -> bool:
    """False for a trainer (`-Q imgq.train`): it needs no model to start and loads none."""
    amqp = getattr(getattr(sender, "app", None), "amqp", None)
    if amqp is None:
        return True
    names = set(amqp.queues.consume_from or amqp.queues)
    return not names or app_settings().classify_queue in names


@signals.worker_init.connect
def _refuse_without_model(sender: Any = None, **_: Any) -> None:
    # Checked on disk only: worker_init runs in the parent of a prefork pool, where CUDA must stay untouched.
    from model.registry import champion_version

    settings = app_settings()
    if _serves_classify(sender) and champion_version(settings.model_dir) is None:
        print(f"imgq worker: no model in {settings.model_dir} ({settings.env_name('model_dir')}). "
              "Train one first: imgq train --data demo", file=sys.stderr, flush=True)
        # Celery swallows exceptions from signal handlers; a worker without a model must not start.
        os._exit(3)


@signals.worker_init.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    metrics.start_server(app_settings().metrics_port, node=str(getattr(sender, "hostname", "")))


@signals.before_task_publish.connect
def _stamp_enqueue_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    metrics.stamp_enqueued(headers)  # runs in the producer: lets the worker measure queue wait


@signals.task_prerun.connect
def _observe_queue_wait(task: Any = None, **_: Any) -> None:
    metrics.observe_queue_wait(task.name, task.request)


@signals.worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    # In the threads/solo pool this process serves tasks: load the model now, not on the first batch.
    pool = str(app.conf.worker_pool)
    if pool in ("threads", "solo") and _serves_classify(sender):
        from worker.engine import get_engine

        engine = get_engine()
        metrics.set_model(engine.model.version, engine.device)


@signals.worker_process_init.connect
def _warm_up_child(**_: Any) -> None:
    from worker.engine import get_engine

    get_engine()


@signals.worker_shutdown.connect
def _close_engine(**_: Any) -> None:
    from worker.engine import close_engine

    close_engine()
