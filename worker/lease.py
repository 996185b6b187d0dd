"""Per-batch leases: which delivery of a batch is working on it, kept alive while its worker lives.

kombu delivers a batch again once it has been unacknowledged for the visibility timeout, whether or not the
first worker is still on it. So a delivery counts towards ``IMGQ_MAX_DELIVERIES`` only if it takes the batch's
lease (``imgq:job:<id>:lease:<batch>``, :meth:`imgq.jobs.JobStore.claim_batch`). A copy that finds the lease
held waits for the holder: if the holder finishes, the copy finds the batch done; if the holder dies, its lease
expires within ``IMGQ_LEASE`` and the copy takes over, counted. One daemon thread per process
(:class:`LeaseKeeper`) renews every lease the process holds every ``IMGQ_LEASE``/3 s. A token is unique to
one delivery, not to a process: a redelivered copy may land on another thread of the same process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from imgq.jobs import Claim, JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    job_id: str
    batch_id: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def wait_bound_s(task_time_limit_s: float, lease_s: float) -> float:
    """How long a copy waits for a live holder: its batch is bounded by the task time limit; past that (and two
    leases' slack) the holder is hung, renewing without progress, and the copy takes the batch over."""
    return task_time_limit_s + 2 * lease_s


def claim(store: JobStore, lease: Lease, indices: Sequence[int], *, lease_s: float, wait_s: float) -> Claim:
    """Claim the batch for this delivery, waiting (bounded by ``wait_s``) while another delivery holds it."""
    lease_ms = max(1, int(lease_s * 1000))
    start = time.monotonic()
    waited = False
    while True:
        take_over = waited and time.monotonic() - start >= wait_s
        outcome = store.claim_batch(lease.job_id, lease.batch_id, indices, token=lease.token, lease_ms=lease_ms,
                                    take_over=take_over)
        if take_over and outcome.state == "claimed":
            log.warning("job %s batch %d: its holder kept renewing its lease for %g s without finishing (hung?); "
                        "taking over as delivery %d", lease.job_id, lease.batch_id, wait_s, outcome.deliveries)
        if outcome.state != "held":
            if waited:
                log.info("job %s batch %d: waited %.1f s for the lease; the batch is %s", lease.job_id,
                         lease.batch_id, time.monotonic() - start, "done" if outcome.state == "done" else
                         f"{outcome.state} (delivery {outcome.deliveries}, its holder stopped)")
            return outcome
        if not waited:
            # Not a lost delivery: the batch outlived the visibility timeout on a worker that is still alive.
            log.warning("job %s batch %d: delivered again while a live worker holds its lease (the batch outlived "
                        "IMGQ_VISIBILITY_TIMEOUT); waiting for that worker, at most %g s", lease.job_id,
                        lease.batch_id, wait_s)
            waited = True
        time.sleep(lease_s / 6)


class LeaseKeeper:
    """Renews the leases this process holds, from one daemon thread, until they are dropped."""

    def __init__(self) -> None:
        self._held: dict[Lease, tuple[JobStore, float]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, store: JobStore, lease: Lease, lease_s: float) -> None:
        with self._cond:
            self._held[lease] = (store, lease_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="imgq-lease", daemon=True)
                self._thread.start()
            self._cond.notify()

    def drop(self, lease: Lease) -> None:
        with self._cond:
            self._held.pop(lease, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held:
                    self._cond.wait()
                period = min(lease_s for _, lease_s in self._held.values()) / 3
                self._cond.wait(period)
                held = dict(self._held)
            self._renew(held)

    def _renew(self, held: dict[Lease, tuple[JobStore, float]]) -> None:
        by_store: dict[int, tuple[JobStore, list[tuple[Lease, float]]]] = {}
        for lease, (store, lease_s) in held.items():
            by_store.setdefault(id(store), (store, []))[1].append((lease, lease_s))
        for store, leases in by_store.values():
            lease_ms = max(1, int(max(s for _, s in leases) * 1000))
            try:
                renewed = store.renew_leases([(le.job_id, le.batch_id, le.token) for le, _ in leases],
                                             lease_ms=lease_ms)
            except redis.RedisError as exc:  # Redis down: the leases may lapse; the batches still finish
                log.warning("cannot renew %d batch leases: %s", len(leases), exc)
                continue
            except Exception as exc:  # a daemon thread must not die: its other stores' leases still need renewing
                # The store's client was closed under us (its owner shut down; redis-py then fails with OSError,
                # ValueError or AttributeError from its parser): nothing left to renew for it.
                log.info("batch leases of a closed store dropped: %s", exc)
                for lease, _ in leases:
                    self.drop(lease)
                continue
            for (lease, _), ok in zip(leases, renewed, strict=True):
                if not ok:
                    # Released by its write a moment ago, or lost: it expired (this process stalled longer than a
                    # lease) or a copy that waited past its bound took it over. Either way, stop renewing it.
                    log.info("job %s batch %d: lease no longer ours", lease.job_id, lease.batch_id)
                    self.drop(lease)


_keeper = LeaseKeeper()


def keeper() -> LeaseKeeper:
    """This process's lease keeper."""
    return _keeper
