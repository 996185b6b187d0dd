"""The lost-batch sweep: send again a batch that is nowhere, from the payload kept in Redis.

kombu's Redis transport takes a message off the queue (BRPOP) before it records it as unacknowledged, so a
worker killed in between takes the batch with it and no visibility timeout brings it back (kombu #305, #1733,
celery #7950). Each batch's (index, URL) pairs stay in ``imgq:job:<id>:pending`` until its results are
written (:meth:`imgq.jobs.JobStore.reserve_batch`). Every ``IMGQ_SWEEP_INTERVAL`` one classify worker (a
Redis lock picks it) looks at each pending batch of each active job: leased by a live delivery, unacknowledged
at kombu, or still queued means it is somewhere. A batch found nowhere in two sweeps in a row is sent again.

Results are first-wins and a copy of a finished batch is not counted as a delivery (the claim finds it done),
so a false alarm only repeats work.
"""

from __future__ import annotations

import logging
import socket
import threading

import redis
from celery import Celery
from kombu.exceptions import KombuError

from imgq.jobs import JobStore, argsrepr, item_rows
from imgq.settings import Settings

log = logging.getLogger(__name__)

TASK = "imgq.classify"  # worker.app.CLASSIFY_TASK; not imported, so this module never builds the app


class Sweeper:
    def __init__(self, store: JobStore, app: Celery, settings: Settings, *, task: str = TASK) -> None:
        self.store = store
        self.app = app
        self.settings = settings
        self.task = task
        self.name = f"{socket.gethostname()}:{threading.get_native_id()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sweeper:
        self._thread = threading.Thread(target=self._run, name="imgq-sweep", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval_s):
            try:
                self.sweep_once()
            except (redis.RedisError, KombuError, OSError) as exc:  # Redis down or full: the next sweep tries again
                log.warning("lost-batch sweep failed: %s", exc)
            except Exception:  # a bug here must not stop the worker or the next sweeps
                log.exception("lost-batch sweep failed")

    def sweep_once(self) -> list[tuple[str, int]]:
        """One sweep, if no other worker swept within the interval; returns the batches sent again."""
        interval_ms = max(1, int(self.settings.sweep_interval_s * 1000))
        if not self.store.take_sweep_lock(self.name, ttl_ms=interval_ms):
            return []
        pending: dict[str, list[int]] = {}
        for job_id in self.store.active_jobs():
            batches = self.store.pending_batches(job_id)  # None: the job is gone or done, and left the set
            if batches:
                pending[job_id] = batches
        nowhere: set[tuple[str, int]] = set()
        if pending:
            leased = {job_id: self.store.leased(job_id, batches) for job_id, batches in pending.items()}
            with_broker = self.store.batches_with_the_broker(self.settings.classify_queue)
            nowhere = {(job_id, b) for job_id, batches in pending.items() for b in batches
                       if b not in leased[job_id] and (job_id, b) not in with_broker}
        before = self.store.swap_sweep_suspects(nowhere, ttl_ms=3 * interval_ms)
        resent: list[tuple[str, int]] = []
        for job_id, batch_id in sorted(nowhere & before):
            batch = self.store.pending_batch(job_id, batch_id)
            if batch is None:  # its results were written meanwhile
                continue
            items, kept = batch
            self.app.send_task(self.task, args=[job_id, batch_id, item_rows(items, kept)],
                               queue=self.settings.classify_queue, argsrepr=argsrepr(job_id, batch_id, len(items)))
            log.warning("job %s batch %d: not queued, not unacknowledged and not leased in two sweeps %g s apart "
                        "(lost between the broker's pop and its unacked record?): sent again (%d URLs)",
                        job_id, batch_id, self.settings.sweep_interval_s, len(items))
            resent.append((job_id, batch_id))
        return resent
