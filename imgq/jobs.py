"""Job records and results in Redis: the one place that knows the key layout.

    imgq:jobs                      ZSET   job id -> created (unix s), for `imgq status` without a job
    imgq:job:<id>                  HASH   total, batches, submitted (0/1), created, finished, failed, ...
    imgq:job:<id>:results          HASH   index -> result record (JSON); first write wins
    imgq:job:<id>:deliveries       HASH   batch id -> times a worker started it
    imgq:job:<id>:dead             LIST   batches given up after too many deliveries (JSON)

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

from imgq.errors import ErrorCode, ImgqError, ItemError

PREFIX = "imgq"
_JOBS_INDEX = f"{PREFIX}:jobs"
# Keep the recent-jobs index from growing without bound.
_JOBS_INDEX_MAX = 1000

# KEYS: results hash, job hash. ARGV: ttl, then (index, record json, is_error) triples.
_WRITE_RESULTS = """
local written = 0
local failed = 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    written = written + 1
    if ARGV[i + 2] == '1' then failed = failed + 1 end
  end
end
if failed > 0 then redis.call('HINCRBY', KEYS[2], 'failed', failed) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return written
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


class JobStore:
    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._write = client.register_script(_WRITE_RESULTS)

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
        """Count what was enqueued; called after the messages are sent, so total never over-promises."""
        with self.r.pipeline() as p:
            p.hincrby(self._job(job_id), "total", items)
            p.hincrby(self._job(job_id), "batches", batches)
            p.execute()

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
        """Write records first-wins; returns how many were new."""
        if not records:
            return 0
        argv: list[Any] = [self.ttl_s]
        for rec in records:
            argv += [rec["index"], json.dumps(rec, separators=(",", ":")), "1" if rec["error"] else "0"]
        return int(self._write(keys=[f"{self._job(job_id)}:results", self._job(job_id)], args=argv))

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

    def unfinished(self, job_id: str, items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """The items that have no result yet (one round trip)."""
        written = self.r.hmget(f"{self._job(job_id)}:results", [str(i) for i, _ in items])
        return [item for item, raw in zip(items, written, strict=True) if raw is None]

    def missing_indices(self, job_id: str, total: int, chunk: int = 5000) -> list[int]:
        return [i for i, rec in enumerate(self.iter_results(job_id, total, chunk)) if rec is None]

    def recent_jobs(self, limit: int = 10) -> list[str]:
        return [raw.decode() for raw in self.r.zrevrange(_JOBS_INDEX, 0, limit - 1)]  # type: ignore[union-attr]
