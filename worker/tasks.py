"""Celery tasks: thin wrappers that unpack the message and call plain functions."""

from __future__ import annotations

from functools import cache

from imgq.jobs import JobStore
from worker.app import CLASSIFY_TASK, app, app_settings
from worker.engine import get_engine
from worker.pipeline import classify_batch


@cache
def _store() -> JobStore:
    settings = app_settings()
    return JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)


@app.task(name=CLASSIFY_TASK)
def classify(job_id: str, batch_id: int, items: list[list[object]]) -> int:
    pairs = [(int(str(index)), str(url)) for index, url in items]
    return classify_batch(get_engine(), _store(), job_id, batch_id, pairs)
