"""Job records and results in Redis: the one place that knows the key layout.

    imgq:jobs                      ZSET   job id -> created (unix s), for `imgq status` without a job
    imgq:job:<id>                  HASH   total, batches, submitted (0/1), created, finished, failed, ...
    imgq:job:<id>:results          HASH   index -> result record (JSON); first write wins
    imgq:job:<id>:deliveries       HASH   batch id -> times a worker started it
    imgq:job:<id>:dead             LIST   batches given up after too many deliveries (JSON)
    imgq:written:<window>          STRING results written per 10 s window (imgq.throughput)
    imgq:champion                  STRING the champion model version (imgq.champion)

Results are written with HSETNX inside one Lua script per batch, so a redelivered batch can neither
double-count nor overwrite a result, and the write is one round trip. Every key carries the job TTL.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from imgq import throughput
from imgq.errors import ErrorCode, ImgqError, ItemError

PREFIX = "imgq"
_JOBS_INDEX = f"{PREFIX}:jobs"
# Keep the recent-jobs index from growing without bound.
_JOBS_INDEX_MAX = 1000

# KEYS: results hash, job hash, throughput window counter. ARGV: ttl, window ttl, then (index, record json,
# is_error) triples.
_WRITE_RESULTS = """
local written = 0
local failed = 0
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    written = written + 1
    if ARGV[i + 2] == '1' then failed = failed + 1 end
  end
end
if failed > 0 then redis.call('HINCRBY', KEYS[2], 'failed', failed) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if written > 0 then
  redis.call('INCRBY', KEYS[3], written)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return written
"""

# KEYS: job hash, queue list. ARGV: new items, bytes the message needs. Counts a batch only if Redis has room
# for its message: the send that would follow is then not refused for memory, so the count stays true.
_RESERVE_BATCH = """
local info = redis.call('INFO', 'memory')
local used = tonumber(string.match(info, 'used_memory:(%d+)'))
local max = tonumber(string.match(info, 'maxmemory:(%d+)'))
if max > 0 and used + tonumber(ARGV[2]) > max then return {-1, used, max} end
redis.call('HINCRBY', KEYS[1], 'total', ARGV[1])
local batches = redis.call('HINCRBY', KEYS[1], 'batches', 1)
return {batches - 1, redis.call('LLEN', KEYS[2]), max}
"""


def result_record(index: int, url: str, *, topk: Sequence[tuple[str, float]] = (),
                  model_version: str | None = None, error: ItemError | None = None) -> dict[str, Any]:
    """The stable result contract (README, "The result record")."""
    ok = error is None and len(topk) > 0
    return {
        "index": index,
        "url": url,
        "label": topk[0][0] if ok else None,
        "confidence": round(topk[0][1], 6) if ok else None,
        "topk": [{"label": label, "score": round(score, 6)} for label, score in topk] if ok else [],
        "model_version": model_version,
        "error": error.to_dict() if error is not None else None,
    }


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    total: int
    done: int
    failed: int
    submitted: bool
    dead_batches: int
    created: float

    @property
    def pending(self) -> int:
        return self.total - self.done

    @property
    def state(self) -> str:
        if not self.submitted:
            return "submitting"
        return "done" if self.done >= self.total else "running"

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "total": self.total, "done": self.done, "failed": self.failed,
                "pending": self.pending, "state": self.state, "dead_batches": self.dead_batches}


class JobNotFoundError(ImgqError):
    pass


class RedisFullError(ImgqError):
    """Redis (maxmemory, noeviction) has no room for the next message."""


class JobStore:
    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._write = client.register_script(_WRITE_RESULTS)
        self._reserve = client.register_script(_RESERVE_BATCH)

    @classmethod
    def from_url(cls, url: str, *, ttl_s: int) -> JobStore:
        # Retries ride out a Redis restart or a dropped connection (the socket is re-opened per retry).
        client = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30,
            retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=2.0), retries=20),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, ttl_s=ttl_s)

    @staticmethod
    def _job(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    def create_job(self, meta: dict[str, str] | None = None) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        key = self._job(job_id)
        with self.r.pipeline() as p:
            fields: dict[str, str | int | float] = {"total": 0, "batches": 0, "submitted": 0, "failed": 0,
                                                    "created": now, **(meta or {})}
            p.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's Mapping is invariant
            p.expire(key, self.ttl_s)
            p.zadd(_JOBS_INDEX, {job_id: now})
            p.zremrangebyrank(_JOBS_INDEX, 0, -_JOBS_INDEX_MAX - 1)
            p.execute()
        return job_id

    def add_batches(self, job_id: str, *, items: int, batches: int) -> None:
        """Count batches enqueued by hand (tests); `imgq submit` counts each batch with :meth:`reserve_batch`."""
        with self.r.pipeline() as p:
            p.hincrby(self._job(job_id), "total", items)
            p.hincrby(self._job(job_id), "batches", batches)
            p.execute()

    def reserve_batch(self, job_id: str, *, new_items: int, queue: str, message_bytes: int) -> tuple[int, int]:
        """Count one batch *before* its message is sent; returns (batch id, queue depth before the send).

        Counting first means ``total`` never under-counts (a result at an index >= total would end a job
        early), and checking for room first means a full Redis stops a submission with
        :class:`RedisFullError` before the count, not after it. ``new_items`` is 0 when reconcile re-enqueues
        items already counted. The queue is the list kombu's Redis transport keeps under the queue's name.
        """
        batch, second, third = self._reserve(keys=[self._job(job_id), queue], args=[new_items, message_bytes])
        if batch < 0:
            raise RedisFullError(f"Redis is out of memory: {second} bytes used of maxmemory {third}, and the next "
                                 f"batch needs about {message_bytes}")
        return int(batch), int(second)

    def queue_depth(self, queue: str) -> int:
        return int(self.r.llen(queue))

    def finish_submission(self, job_id: str) -> None:
        self.r.hset(self._job(job_id), "submitted", 1)

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._job(job_id)))

    def status(self, job_id: str) -> JobStatus:
        with self.r.pipeline() as p:
            p.hgetall(self._job(job_id))
            p.hlen(f"{self._job(job_id)}:results")
            p.llen(f"{self._job(job_id)}:dead")
            meta, done, dead = p.execute()
        if not meta:
            raise JobNotFoundError(f"no job {job_id!r} in Redis (wrong id, or it expired)")
        return JobStatus(job_id=job_id, total=int(meta[b"total"]), done=int(done), failed=int(meta[b"failed"]),
                         submitted=meta[b"submitted"] == b"1", dead_batches=int(dead),
                         created=float(meta[b"created"]))

    def count_delivery(self, job_id: str, batch_id: int) -> int:
        """How many times this batch has been started, this time included."""
        key = f"{self._job(job_id)}:deliveries"
        with self.r.pipeline() as p:
            p.hincrby(key, str(batch_id), 1)
            p.expire(key, self.ttl_s)
            n, _ = p.execute()
        return int(n)

    def write_results(self, job_id: str, records: Sequence[dict[str, Any]]) -> int:
        """Write records first-wins; returns how many were new (also added to the throughput window)."""
        if not records:
            return 0
        argv: list[Any] = [self.ttl_s, throughput.WINDOW_TTL_S]
        for rec in records:
            argv += [rec["index"], json.dumps(rec, separators=(",", ":")), "1" if rec["error"] else "0"]
        keys = [f"{self._job(job_id)}:results", self._job(job_id), throughput.window_key()]
        return int(self._write(keys=keys, args=argv))

    def give_up_batch(self, job_id: str, batch_id: int, items: Sequence[tuple[int, str]], deliveries: int) -> int:
        """A batch kept killing workers: its unfinished items end as worker_lost (dead-letter list)."""
        err = ItemError(ErrorCode.WORKER_LOST, f"batch {batch_id} was delivered {deliveries} times and never "
                        "finished (a worker died on it each time); see `imgq status` dead batches")
        key = f"{self._job(job_id)}:dead"
        with self.r.pipeline() as p:
            p.rpush(key, json.dumps({"batch": batch_id, "deliveries": deliveries,
                                     "indices": [i for i, _ in items]}))
            p.expire(key, self.ttl_s)
            p.execute()
        return self.write_results(job_id, [result_record(i, u, error=err) for i, u in items])

    def dead_batches(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.r.lrange(f"{self._job(job_id)}:dead", 0, -1)]

    def iter_results(self, job_id: str, total: int, chunk: int = 5000) -> Iterator[dict[str, Any] | None]:
        """Results in input order; None where an index has no result yet."""
        key = f"{self._job(job_id)}:results"
        for start in range(0, total, chunk):
            fields = [str(i) for i in range(start, min(start + chunk, total))]
            for raw in self.r.hmget(key, fields):
                yield None if raw is None else json.loads(raw)

    def results_at(self, job_id: str, indices: Sequence[int]) -> list[dict[str, Any] | None]:
        """The result records at these indices (one round trip); None where there is none."""
        raws = self.r.hmget(f"{self._job(job_id)}:results", [str(i) for i in indices])
        return [None if raw is None else json.loads(raw) for raw in raws]

    def unfinished(self, job_id: str, items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """The items that have no result yet (one round trip)."""
        written = self.r.hmget(f"{self._job(job_id)}:results", [str(i) for i, _ in items])
        return [item for item, raw in zip(items, written, strict=True) if raw is None]

    def missing_indices(self, job_id: str, total: int, chunk: int = 5000) -> list[int]:
        return [i for i, rec in enumerate(self.iter_results(job_id, total, chunk)) if rec is None]

    def recent_jobs(self, limit: int = 10) -> list[str]:
        return [raw.decode() for raw in self.r.zrevrange(_JOBS_INDEX, 0, limit - 1)]  # type: ignore[union-attr]
