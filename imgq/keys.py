"""Every Redis key imgq uses, built here and nowhere else (arq keeps its prefixes in one module the same way).

    imgq:jobs                        ZSET   job id -> created (unix s), for `imgq status` without a job
    imgq:job:<id>                    HASH   total, batches, submitted (0/1), created, failed, ...
    imgq:job:<id>:results            HASH   index -> result record (JSON); first write wins; emptied by --follow
    imgq:job:<id>:exported           STRING bitmap: bit <index> set once its result is in a committed part file
    imgq:job:<id>:export             HASH   the --follow cursor: part (next part number), dir, format
    imgq:job:<id>:export:lock        STRING the token of the live --follow exporter; PX IMGQ_LEASE, renewed
    imgq:job:<id>:deliveries         STRING one byte per batch id (BITFIELD u8, saturating): times a worker
                                            started it (a lease it took); ~1 KB per 64k URLs at rest
    imgq:job:<id>:dead               LIST   batches given up after too many deliveries (JSON)
    imgq:job:<id>:pending            HASH   batch id -> its (index, URL) pairs (JSON), until its results are written
    imgq:job:<id>:lease:<batch>      STRING the token of the delivery working on the batch; PX IMGQ_LEASE, renewed
    imgq:active                      SET    job ids that may have pending batches (what the sweep looks at)
    imgq:sweep:lock                  STRING held by the worker sweeping now; PX IMGQ_SWEEP_INTERVAL
    imgq:sweep:suspects              SET    "<job> <batch>" found nowhere by the last sweep
    imgq:written:<window>            STRING results written per 10 s window (imgq.throughput)
    imgq:champion                    STRING the champion model version (model.champion)
    imgq:champion:history            LIST   promoted versions, oldest first (rollback goes back one)
    imgq:retrain:lock                STRING the run holding the retrain lease; PX IMGQ_LEASE, renewed
    imgq:retrain:last_run            STRING the run that took the lock last
    imgq:retrain:<run>:events        LIST   a retrain's progress events (JSON) that `imgq retrain --wait` follows
    imgq:retrain:<run>:final         STRING set once: the run's final event was written
    imgq:beat:<entry>:<tick>         STRING a beat claimed this schedule tick (SET NX)

kombu's own keys, read by the sweep and `imgq status`: the queue list (named as the queue) and ``unacked``
(HASH delivery tag -> the message a worker holds).
"""

from __future__ import annotations

PREFIX = "imgq"

JOBS_INDEX = f"{PREFIX}:jobs"
ACTIVE_JOBS = f"{PREFIX}:active"
SWEEP_LOCK = f"{PREFIX}:sweep:lock"
SWEEP_SUSPECTS = f"{PREFIX}:sweep:suspects"
CHAMPION = f"{PREFIX}:champion"
CHAMPION_HISTORY = f"{PREFIX}:champion:history"
RETRAIN_LOCK = f"{PREFIX}:retrain:lock"
RETRAIN_LAST_RUN = f"{PREFIX}:retrain:last_run"
# kombu's Redis transport: delivered-but-unacknowledged messages (transport option unacked_key's default).
KOMBU_UNACKED = "unacked"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def results(job_id: str) -> str:
    return f"{job(job_id)}:results"


def exported(job_id: str) -> str:
    return f"{job(job_id)}:exported"


def export_cursor(job_id: str) -> str:
    return f"{job(job_id)}:export"


def export_lock(job_id: str) -> str:
    return f"{export_cursor(job_id)}:lock"


def deliveries(job_id: str) -> str:
    return f"{job(job_id)}:deliveries"


def dead(job_id: str) -> str:
    return f"{job(job_id)}:dead"


def pending(job_id: str) -> str:
    return f"{job(job_id)}:pending"


def lease(job_id: str, batch_id: int | str) -> str:
    return f"{job(job_id)}:lease:{batch_id}"


def job_pattern(job_id: str) -> str:
    """Every key of one job (SCAN MATCH)."""
    return f"{job(job_id)}*"


def written_window(window: int) -> str:
    return f"{PREFIX}:written:{window}"


def retrain_events(run_id: str) -> str:
    return f"{PREFIX}:retrain:{run_id}:events"


def retrain_final(run_id: str) -> str:
    return f"{PREFIX}:retrain:{run_id}:final"


def beat_tick(entry: str, tick: int) -> str:
    return f"{PREFIX}:beat:{entry}:{tick}"
