"""`imgq status` without a job id: what the whole deployment is doing now.

Everything comes from the shared Redis, so it works from any host: queue depths and unacknowledged
messages (kombu's keys), live workers (a Celery ping), results written in the last minute
(:mod:`imgq.throughput`), and the recent jobs (:meth:`JobStore.recent_jobs`). The champion is the pointer in Redis
(:mod:`model.champion`), falling back to ``IMGQ_MODEL_DIR`` as seen from this host.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from imgq import keys
from imgq.jobs import JobNotFoundError, JobStore
from imgq.settings import Settings
from imgq.throughput import written_last

# kombu's Redis transport keeps delivered-but-unacknowledged messages in this hash (its default unacked_key).
_UNACKED_KEY = keys.KOMBU_UNACKED
THROUGHPUT_WINDOW_S = 60


@dataclass
class Overview:
    queues: dict[str, int]            # queue name -> batches waiting
    unacked: int                      # batches delivered to a worker and not yet finished
    workers: list[str]                # Celery node names that answered a ping
    written_last_minute: int          # results written by all workers in the last minute
    champion: str | None
    model_dir: str
    jobs: list[dict[str, Any]]        # most recent first: JobStatus.to_dict() plus "created"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def collect_overview(settings: Settings, store: JobStore, app: Celery, *, recent: int = 10,
                     ping_timeout_s: float = 1.0) -> Overview:
    from model.champion import Champion  # imports torch (via model): only here, not on `imgq status JOB`

    queues = [settings.classify_queue, settings.train_queue]
    with store.r.pipeline(transaction=False) as p:
        for q in queues:
            p.llen(q)
        p.hlen(_UNACKED_KEY)
        *depths, unacked = p.execute()
    replies = app.control.ping(timeout=ping_timeout_s)
    workers = sorted(node for reply in replies for node in reply)
    jobs = []
    for job_id in store.recent_jobs(recent):
        try:
            status = store.status(job_id)
        except JobNotFoundError:  # in the index, but its keys expired
            continue
        jobs.append({**status.to_dict(), "created": status.created})
    return Overview(queues=dict(zip(queues, map(int, depths), strict=True)), unacked=int(unacked),
                    workers=workers, written_last_minute=written_last(store.r, THROUGHPUT_WINDOW_S),
                    champion=Champion(settings.model_dir, store.r).get(), model_dir=str(settings.model_dir), jobs=jobs)


def _age(created: float, now: float) -> str:
    seconds = max(0, int(now - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def format_overview(o: Overview, *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        "queues:     " + ", ".join(f"{q} {n}" for q, n in o.queues.items()) + f" waiting; {o.unacked} in flight",
        f"workers:    {len(o.workers)} live" + (f" ({', '.join(o.workers)})" if o.workers else ""),
        f"throughput: {o.written_last_minute} results in the last minute "
        f"({o.written_last_minute / THROUGHPUT_WINDOW_S:.1f}/s)",
        f"champion:   {o.champion or 'none'} (in {o.model_dir})",
        f"recent jobs ({len(o.jobs)}):",
    ]
    if not o.jobs:
        lines.append("  none")
    for job in o.jobs:
        lines.append(f"  {job['job_id']}  {job['state']:<10} {job['done']:>7}/{job['total']:<7} "
                     f"failed {job['failed']:<6} {_age(job['created'], now)}")
    return "\n".join(lines)
