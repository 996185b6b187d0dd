"""Job records and results in Redis. The key layout is :mod:`imgq.keys` (every key is built there).

kombu's own keys that the sweep reads: the queue list (named as the queue) and ``unacked`` (HASH delivery
tag -> the message a worker holds).

Results are written with HSETNX inside one Lua script per batch, so a redelivered batch can neither
double-count nor overwrite a result, and the write is one round trip. Every ``imgq:job:<id>*`` key carries
a TTL (the job's, or the lease's). Every script that writes a job's keys first checks that the job hash
exists: a write for a job Redis no longer knows (expired, or lost in a restart without persistence) writes
nothing, so it can never leave keys without the job record or without a TTL.

`imgq results JOB --follow` (:mod:`producer.follow`) moves finished results out of Redis into part files.
An index whose result has left is marked in the ``exported`` bitmap (one bit an index), set in the same Lua
call that deletes it from the results hash, and the job hash counts it (``exported``). So "this index has a
result" is: in the results hash, or its bit set. Every check (the write's first-wins, the claim, unfinished,
missing_indices, status) asks both, and a redelivered batch cannot add a second result for an index that was
exported. A job that is never followed has no bitmap at all: nothing is set until a result leaves.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import redis

from imgq import keys, redis_conn, throughput
from imgq.errors import ErrorCode, ImgqError, ItemError

# Keep the recent-jobs index from growing without bound.
_JOBS_INDEX_MAX = 1000
# What `imgq submit` prints as a job id (uuid4().hex).
_JOB_ID = re.compile(r"[0-9a-f]{32}")

# KEYS: results, job hash, throughput window, pending, lease, dead list, active set, exported bitmap. ARGV: ttl,
# window ttl, job id, batch id ('' for none), lease token ('' for none), dead-letter entry ('' for none), then
# (index, record json, is_error) triples. -1: the job hash is gone, nothing written. Writing a batch's results
# ends it: its pending payload goes, and its lease if it is still this delivery's. An exported index (its bit
# set) already has its result, in a part file.
_WRITE_RESULTS = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local written = 0
local failed = 0
for i = 7, #ARGV, 3 do
  if redis.call('GETBIT', KEYS[8], ARGV[i]) == 0 and redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
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
if ARGV[6] ~= '' then
  redis.call('RPUSH', KEYS[6], ARGV[6])
  redis.call('EXPIRE', KEYS[6], ARGV[1])
end
if ARGV[4] ~= '' and redis.call('HDEL', KEYS[4], ARGV[4]) == 1 and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('SREM', KEYS[7], ARGV[3])
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[5]) == ARGV[5] then redis.call('DEL', KEYS[5]) end
return written
"""

# KEYS: job hash, queue list, pending, active set. ARGV: new items, bytes the message needs, batch payload
# ('' for none), ttl, job id. Counts a batch only if Redis has room for its message: the send that would
# follow is then not refused for memory, so the count stays true. Keeps the payload until the batch's results
# are written, so a batch the broker lost can be sent again without the user's file.
_RESERVE_BATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2, 0, 0} end
local info = redis.call('INFO', 'memory')
local used = tonumber(string.match(info, 'used_memory:(%d+)'))
local max = tonumber(string.match(info, 'maxmemory:(%d+)'))
if max > 0 and used + tonumber(ARGV[2]) > max then return {-1, used, max} end
redis.call('HINCRBY', KEYS[1], 'total', ARGV[1])
local batches = redis.call('HINCRBY', KEYS[1], 'batches', 1)
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], batches - 1, ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('SADD', KEYS[4], ARGV[5])
end
return {batches - 1, redis.call('LLEN', KEYS[2]), max}
"""

# KEYS: job hash, results, lease, deliveries, pending, active set, exported bitmap. ARGV: token, lease ms, ttl,
# batch id, take over (1/0), job id, then the batch's indices. -1: job gone; 0: every item has a result (a copy
# of a finished batch: not a delivery); -2: another delivery holds the lease; n > 0: leased, and this is
# delivery n.
_CLAIM_BATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local done = true
for i = 7, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 and redis.call('GETBIT', KEYS[7], ARGV[i]) == 0 then
    done = false
    break
  end
end
if done then
  if redis.call('HDEL', KEYS[5], ARGV[4]) == 1 and redis.call('EXISTS', KEYS[5]) == 0 then
    redis.call('SREM', KEYS[6], ARGV[6])
  end
  return 0
end
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
local n = redis.call('BITFIELD', KEYS[4], 'OVERFLOW', 'SAT', 'INCRBY', 'u8', '#' .. ARGV[4], 1)[1]
redis.call('EXPIRE', KEYS[4], ARGV[3])
return n
"""

# KEYS: a lease. ARGV: token, lease ms. Extends the lease only while it is still this delivery's.
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: a lease. ARGV: token.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: job hash, pending, active set. ARGV: job id. The pending batch ids, or nil (and the job leaves the
# active set) when the job is gone or has none: atomic, so a batch reserved meanwhile is never dropped.
_PENDING_BATCHES = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.call('HKEYS', KEYS[2])
end
redis.call('SREM', KEYS[3], ARGV[1])
return false
"""

# KEYS: job hash. Marks a submission complete, only for a job Redis still knows.
_FINISH_SUBMISSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'submitted', 1)
return 1
"""

# KEYS: a queue list. ARGV: start, stop. How many messages that range holds, then the "<job> <batch>" of each
# one, read from the argsrepr header imgq's producers write ("['<job>', <batch>, <n URLs>]"; Celery's own
# saferepr starts the same), so a sweep moves a few bytes per message, not the URLs.
_QUEUED_BATCHES = """
local messages = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
local out = {#messages}
for _, m in ipairs(messages) do
  local job, batch = string.match(m, '"argsrepr": "%[\\'(%w+)\\', (%d+),')
  if job then out[#out + 1] = job .. ' ' .. batch end
end
return out
"""
_ARGSREPR = re.compile(rb"\"argsrepr\": \"\['(\w+)', (\d+),")

# KEYS: job hash, export lock, export cursor. ARGV: token, lease ms, directory, format, ttl. Takes the job's one
# exporter lease and binds the export to one directory and format: the cursor counts parts in that directory.
# {part}: taken, the next part to write; {-1}: job gone; {-2, ms}: another exporter holds it for ms more;
# {-3, dir, format}: the export is bound to another directory or format.
_TAKE_EXPORT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {-2, redis.call('PTTL', KEYS[2])} end
local bound = redis.call('HMGET', KEYS[3], 'dir', 'format')
if bound[1] and (bound[1] ~= ARGV[3] or bound[2] ~= ARGV[4]) then
  redis.call('DEL', KEYS[2])
  return {-3, bound[1], bound[2]}
end
redis.call('HSET', KEYS[3], 'dir', ARGV[3], 'format', ARGV[4])
redis.call('HSETNX', KEYS[3], 'part', 0)
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {tonumber(redis.call('HGET', KEYS[3], 'part'))}
"""

# KEYS: job hash, results, exported bitmap, export cursor, export lock. ARGV: token, part, ttl, then the part's
# indices. Commits a part that is already on disk (renamed and fsynced): its results leave the hash, their bits
# are set, and the cursor moves past it, all at once. {part + 1, moved}: committed; {-1}: job gone; {-2}: the
# lease is not this exporter's; {-3, part}: the cursor is elsewhere (part + 1: this very commit went through,
# a retry after a dropped reply).
_COMMIT_EXPORT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('GET', KEYS[5]) ~= ARGV[1] then return {-2} end
local part = tonumber(redis.call('HGET', KEYS[4], 'part'))
if part ~= tonumber(ARGV[2]) then return {-3, part} end
local moved = 0
for i = 4, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  if redis.call('SETBIT', KEYS[3], ARGV[i], 1) == 0 then moved = moved + 1 end
end
redis.call('HINCRBY', KEYS[1], 'exported', moved)
redis.call('HSET', KEYS[4], 'part', part + 1)
redis.call('HINCRBY', KEYS[4], 'records', #ARGV - 3)
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[3])
return {part + 1, moved}
"""


def argsrepr(job_id: str, batch_id: int, n: int) -> str:
    """The short argsrepr header of a classify message; the sweep finds queued batches by it."""
    return f"[{job_id!r}, {batch_id}, <{n} URLs>]"


def result_record(index: int, url: str, *, topk: Sequence[tuple[str, float]] = (),
                  model_version: str | None = None, error: ItemError | None = None,
                  kept: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stable result contract (README, "The result record"); ``kept``: the input row's kept columns
    (`--keep`), appended as top-level fields (a name of the record's own is refused at submit)."""
    ok = error is None and len(topk) > 0
    record = {
        "index": index,
        "url": url,
        "label": topk[0][0] if ok else None,
        "confidence": round(topk[0][1], 6) if ok else None,
        "topk": [{"label": label, "score": round(score, 6)} for label, score in topk] if ok else [],
        "model_version": model_version,
        "error": error.to_dict() if error is not None else None,
    }
    if kept:
        record.update((k, v) for k, v in kept.items() if k not in record)
    return record


# The record's own fields: a kept column may not take one of these names.
RECORD_FIELDS: tuple[str, ...] = tuple(result_record(0, ""))

# A batch item's kept columns: column name -> JSON scalar.
Kept = dict[str, Any]


def item_rows(items: Sequence[tuple[int, str]], kept: Mapping[int, Kept] | None = None) -> list[list[Any]]:
    """A batch as it travels, in the classify message and the pending payload: ``[index, url]`` an item, or
    ``[index, url, {column: value}]`` for an item with kept columns. The columns ride with the batch, so Redis
    holds them only while the batch is in flight."""
    kept = kept or {}
    return [[i, str(u), kept[i]] if i in kept else [i, str(u)] for i, u in items]


def split_rows(rows: Iterable[Sequence[Any]]) -> tuple[list[tuple[int, str]], dict[int, Kept]]:
    """:func:`item_rows` read back: the (index, URL) pairs and the kept columns by index."""
    items: list[tuple[int, str]] = []
    kept: dict[int, Kept] = {}
    for row in rows:
        index = int(row[0])
        items.append((index, str(row[1])))
        if len(row) > 2 and row[2]:
            kept[index] = dict(row[2])
    return items, kept


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    total: int
    done: int
    failed: int
    submitted: bool
    dead_batches: int
    created: float
    exported: int = 0  # of ``done``: results `imgq results --follow` moved out of Redis into part files

    @property
    def pending(self) -> int:
        return self.total - self.done

    @property
    def state(self) -> str:
        if not self.submitted:
            return "submitting"
        return "done" if self.done >= self.total else "running"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": self.job_id, "total": self.total, "done": self.done, "failed": self.failed,
               "pending": self.pending, "state": self.state, "dead_batches": self.dead_batches}
        return {**out, "exported": self.exported} if self.exported else out


@dataclass(frozen=True)
class Claim:
    """What one delivery of a batch found: ``claimed`` (it holds the lease; ``deliveries`` counts it),
    ``done`` (every item already has a result), ``held`` (a live delivery holds the lease) or ``lost`` (Redis
    has no record of the job)."""

    state: Literal["claimed", "done", "held", "lost"]
    deliveries: int = 0


@dataclass(frozen=True)
class ExportLease:
    """What an exporter found: ``taken`` (it is the job's exporter; ``part`` is the next part to write),
    ``held`` (another exporter's lease has ``held_ms`` to run) or ``bound`` (the export already writes to
    ``directory`` as ``fmt``)."""

    state: Literal["taken", "held", "bound"]
    part: int = 0
    directory: str = ""
    fmt: str = ""
    held_ms: int = 0


class JobNotFoundError(ImgqError):
    pass


class ExportLeaseLost(ImgqError):
    """Another exporter took the job over (this one stalled past its lease): this one must stop."""


class RedisFullError(ImgqError):
    """Redis (maxmemory, noeviction) has no room for the next message."""


def is_job_id(job_id: str) -> bool:
    return _JOB_ID.fullmatch(job_id) is not None


def job_not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(
        f"no job {job_id!r} in Redis: there is no record of it (a wrong id, expired after IMGQ_JOB_TTL, or lost "
        f"by Redis: a restart without persistence); resubmit, or run `imgq reconcile {job_id} URLS` to recreate "
        "it from the URL file")


class JobStore:
    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._write = client.register_script(_WRITE_RESULTS)
        self._reserve = client.register_script(_RESERVE_BATCH)
        self._claim = client.register_script(_CLAIM_BATCH)
        self._renew = client.register_script(_RENEW_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)
        self._pending = client.register_script(_PENDING_BATCHES)
        self._finish = client.register_script(_FINISH_SUBMISSION)
        self._queued = client.register_script(_QUEUED_BATCHES)
        self._take_export = client.register_script(_TAKE_EXPORT)
        self._commit_export = client.register_script(_COMMIT_EXPORT)

    @classmethod
    def from_url(cls, url: str, *, ttl_s: int, timeout_s: float | None = None) -> Self:
        """``timeout_s`` None: a worker's store, whose retries ride out a Redis restart or a dropped connection
        (the socket is re-opened per retry). A number: a client command's store, which gives up within about
        ``timeout_s`` (IMGQ_REDIS_TIMEOUT) on a Redis that refuses, does not answer or refuses the password."""
        if timeout_s is None:
            client = redis_conn.connect(
                url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30,
                retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=2.0), retries=20),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            )
        else:
            # Worst cases: a black hole costs one connect timeout (a timeout is not retried); a closed port 3
            # connects and 2 pauses of timeout/20; a refused password (an AuthenticationError is a
            # ConnectionError to redis-py) 3 x 3 attempts, 8 pauses; a Redis that accepts but never answers, one
            # read timeout. The retries are for a pooled connection dropped by a Redis restart.
            client = redis_conn.connect(
                url, socket_connect_timeout=timeout_s / 2, socket_timeout=timeout_s, health_check_interval=30,
                retry=redis.retry.Retry(redis.backoff.ConstantBackoff(timeout_s / 20), retries=2,
                                        supported_errors=(redis.ConnectionError,)),  # not its default timeouts
            )
        return cls(client, ttl_s=ttl_s)

    @staticmethod
    def _job(job_id: str) -> str:
        return keys.job(job_id)

    @classmethod
    def _lease(cls, job_id: str, batch_id: int | str) -> str:
        return keys.lease(job_id, batch_id)

    def create_job(self, meta: dict[str, str] | None = None, *, job_id: str | None = None, total: int = 0,
                   failed: int = 0) -> str:
        """A new job record; with ``job_id``, a lost one recreated under its old id (by `imgq reconcile`).

        A recreated job numbers its batches from ``total`` on: a copy of one of the lost record's batches may
        still arrive (a worker hands back what it held), and must not share an id (its lease, delivery count
        and kept payload) with a new batch. A submission gives each batch at least one URL, so its ids were
        all below ``total``."""
        first_batch = total if job_id else 0
        job_id_given = job_id is not None
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        key = self._job(job_id)
        with self.r.pipeline() as p:
            fields: dict[str, str | int | float] = {"total": total, "batches": first_batch, "submitted": 0,
                                                    "failed": failed, "created": now, **(meta or {})}
            if job_id_given:  # a recreated record counts what had already left for part files as done
                fields["exported"] = int(self.r.bitcount(keys.exported(job_id)))
            p.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's Mapping is invariant
            p.expire(key, self.ttl_s)
            p.zadd(keys.JOBS_INDEX, {job_id: now})
            p.zremrangebyrank(keys.JOBS_INDEX, 0, -_JOBS_INDEX_MAX - 1)
            p.execute()
        return job_id

    def add_batches(self, job_id: str, *, items: int, batches: int) -> None:
        """Count batches enqueued by hand (tests); `imgq submit` counts each batch with :meth:`reserve_batch`."""
        with self.r.pipeline() as p:
            p.hincrby(self._job(job_id), "total", items)
            p.hincrby(self._job(job_id), "batches", batches)
            p.execute()

    def reserve_batch(self, job_id: str, *, new_items: int, queue: str, message_bytes: int,
                      items: Sequence[tuple[int, str]] | None = None,
                      kept: Mapping[int, Kept] | None = None) -> tuple[int, int]:
        """Count one batch *before* its message is sent; returns (batch id, queue depth before the send).

        Counting first means ``total`` never under-counts (a result at an index >= total would end a job
        early), and checking for room first means a full Redis stops a submission with
        :class:`RedisFullError` before the count, not after it. ``new_items`` is 0 when reconcile re-enqueues
        items already counted. The queue is the list kombu's Redis transport keeps under the queue's name.
        ``items``, the batch's (index, URL) pairs, are kept in Redis until the batch's results are written, so
        the workers' sweep can send a batch the broker lost again (:mod:`worker.sweep`), with their ``kept``
        columns (:func:`item_rows`).
        """
        payload = "" if items is None else json.dumps(item_rows(items, kept), separators=(",", ":"))
        batch, second, third = self._reserve(
            keys=[self._job(job_id), queue, keys.pending(job_id), keys.ACTIVE_JOBS],
            args=[new_items, message_bytes + len(payload), payload, self.ttl_s, job_id])
        if batch == -2:
            raise job_not_found(job_id)
        if batch < 0:
            raise RedisFullError(f"Redis is out of memory: {second} bytes used of maxmemory {third}, and the next "
                                 f"batch needs about {message_bytes + len(payload)}")
        return int(batch), int(second)

    def queue_depth(self, queue: str) -> int:
        return int(self.r.llen(queue))

    def finish_submission(self, job_id: str) -> None:
        if not self._finish(keys=[self._job(job_id)]):
            raise job_not_found(job_id)

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._job(job_id)))

    def status(self, job_id: str) -> JobStatus:
        with self.r.pipeline() as p:
            p.hgetall(self._job(job_id))
            p.hlen(keys.results(job_id))
            p.llen(keys.dead(job_id))
            meta, done, dead = p.execute()
        if b"total" not in meta:  # gone, or a fragment left by a write before writes checked for the job
            raise job_not_found(job_id)
        exported = int(meta.get(b"exported", 0))
        return JobStatus(job_id=job_id, total=int(meta[b"total"]), done=int(done) + exported,
                         failed=int(meta.get(b"failed", 0)), submitted=meta.get(b"submitted") == b"1",
                         dead_batches=int(dead), created=float(meta.get(b"created", 0)), exported=exported)

    def count_delivery(self, job_id: str, batch_id: int) -> int:
        """Count a delivery without a lease (tests: deliveries that died before this one)."""
        key = keys.deliveries(job_id)
        (n,) = self.r.bitfield(key, default_overflow="SAT").incrby("u8", f"#{batch_id}", 1).execute()
        self.r.expire(key, self.ttl_s)
        return int(n)

    def delivery_counts(self, job_id: str) -> dict[int, int]:
        """Batch id -> how many deliveries started it, for the batches that had one."""
        raw = self.r.get(keys.deliveries(job_id))
        counts = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
        return {batch_id: n for batch_id, n in enumerate(counts) if n}

    def claim_batch(self, job_id: str, batch_id: int, indices: Sequence[int], *, token: str, lease_ms: int,
                    take_over: bool = False) -> Claim:
        """One delivery's claim on a batch (see :class:`Claim`); ``take_over`` ignores a lease held by another
        delivery (one that kept renewing but never finished)."""
        job = self._job(job_id)
        n = int(self._claim(
            keys=[job, keys.results(job_id), self._lease(job_id, batch_id), keys.deliveries(job_id),
                  keys.pending(job_id), keys.ACTIVE_JOBS, keys.exported(job_id)],
            args=[token, lease_ms, self.ttl_s, batch_id, "1" if take_over else "0", job_id, *indices]))
        if n == -1:
            return Claim("lost")
        if n == -2:
            return Claim("held")
        return Claim("done") if n == 0 else Claim("claimed", n)

    def renew_leases(self, leases: Sequence[tuple[str, int, str]], *, lease_ms: int) -> list[bool]:
        """Extend each (job, batch, token) lease still held by its token; False where it is not (one round trip)."""
        with self.r.pipeline(transaction=False) as p:
            for job_id, batch_id, token in leases:
                self._renew(keys=[self._lease(job_id, batch_id)], args=[token, lease_ms], client=p)
            return [bool(ok) for ok in p.execute()]

    def release_lease(self, job_id: str, batch_id: int, token: str) -> None:
        self._release(keys=[self._lease(job_id, batch_id)], args=[token])

    def write_results(self, job_id: str, records: Sequence[dict[str, Any]], *, batch_id: int | None = None,
                      token: str | None = None, dead: dict[str, Any] | None = None) -> int:
        """Write records first-wins; returns how many were new (also added to the throughput window).

        With ``batch_id`` the batch is finished: its pending payload is dropped, and its lease too if ``token``
        still holds it. ``dead`` is a dead-letter entry to add. Raises :class:`JobNotFoundError`, having
        written nothing, if Redis no longer has the job.
        """
        if not records and dead is None and batch_id is None:
            return 0
        job = self._job(job_id)
        argv: list[Any] = [self.ttl_s, throughput.WINDOW_TTL_S, job_id, "" if batch_id is None else batch_id,
                           token or "", "" if dead is None else json.dumps(dead)]
        for rec in records:
            argv += [rec["index"], json.dumps(rec, separators=(",", ":")), "1" if rec["error"] else "0"]
        touched = [keys.results(job_id), job, throughput.window_key(), keys.pending(job_id),
                   self._lease(job_id, "" if batch_id is None else batch_id), keys.dead(job_id), keys.ACTIVE_JOBS,
                   keys.exported(job_id)]
        written = int(self._write(keys=touched, args=argv))
        if written < 0:
            raise job_not_found(job_id)
        return written

    def give_up_batch(self, job_id: str, batch_id: int, items: Sequence[tuple[int, str]], deliveries: int, *,
                      token: str | None = None, kept: Mapping[int, Kept] | None = None) -> int:
        """A batch whose deliveries all stopped before finishing: its unfinished items end as worker_lost (and
        the batch goes to the dead-letter list)."""
        err = ItemError(ErrorCode.WORKER_LOST, f"batch {batch_id} was delivered {deliveries} times and never "
                        "finished: each time the worker on it stopped renewing its lease before writing results "
                        "(it died, hung or lost Redis); see `imgq status` dead batches")
        dead = {"batch": batch_id, "deliveries": deliveries, "indices": [i for i, _ in items]}
        kept = kept or {}
        return self.write_results(job_id, [result_record(i, u, error=err, kept=kept.get(i)) for i, u in items],
                                  batch_id=batch_id, token=token, dead=dead)

    def dead_batches(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.r.lrange(keys.dead(job_id), 0, -1)]

    # The sweep (worker/sweep.py): batches whose payload is kept, and where each one is.

    def take_sweep_lock(self, holder: str, *, ttl_ms: int) -> bool:
        """At most one sweep per ``ttl_ms`` in the whole deployment: the lock is left to expire."""
        return bool(self.r.set(keys.SWEEP_LOCK, holder, nx=True, px=ttl_ms))

    def active_jobs(self) -> list[str]:
        return sorted(raw.decode() for raw in self.r.smembers(keys.ACTIVE_JOBS))  # type: ignore[union-attr]

    def pending_batches(self, job_id: str) -> list[int] | None:
        """The ids of the job's batches whose results are not written; None once the job is gone or has none."""
        job = self._job(job_id)
        ids = self._pending(keys=[job, keys.pending(job_id), keys.ACTIVE_JOBS], args=[job_id])
        return None if ids is None else sorted(int(b) for b in ids)

    def pending_items(self, job_id: str, batch_id: int) -> list[tuple[int, str]] | None:
        batch = self.pending_batch(job_id, batch_id)
        return None if batch is None else batch[0]

    def pending_batch(self, job_id: str, batch_id: int) -> tuple[list[tuple[int, str]], dict[int, Kept]] | None:
        """A kept payload: its (index, URL) pairs and their kept columns (:func:`split_rows`)."""
        raw = self.r.hget(keys.pending(job_id), str(batch_id))
        return None if raw is None else split_rows(json.loads(raw))

    def leased(self, job_id: str, batch_ids: Sequence[int]) -> set[int]:
        with self.r.pipeline(transaction=False) as p:
            for b in batch_ids:
                p.exists(self._lease(job_id, b))
            return {b for b, n in zip(batch_ids, p.execute(), strict=True) if n}

    def batches_with_the_broker(self, queue: str, chunk: int = 500) -> set[tuple[str, int]]:
        """(job, batch) of every classify message kombu holds: unacknowledged first, then queued (a message
        moves from unacked back to the queue when kombu restores it, so in this order it is seen at least once)."""
        unacked: list[bytes] = self.r.hvals(keys.KOMBU_UNACKED)  # type: ignore[assignment]
        found = {(m[1].decode(), int(m[2])) for raw in unacked if (m := _ARGSREPR.search(raw)) is not None}
        start = 0
        while True:
            # LRANGE in chunks, each read server-side down to its (job, batch) pairs. The list may move under
            # us (BRPOP at one end, LPUSH at the other): a batch missed here is only a suspect, not yet resent.
            scanned, *pairs = self._queued(keys=[queue], args=[start, start + chunk - 1])
            for pair in pairs:
                job, batch = pair.decode().split()
                found.add((job, int(batch)))
            if int(scanned) < chunk:
                return found
            start += chunk

    def swap_sweep_suspects(self, suspects: set[tuple[str, int]], *, ttl_ms: int) -> set[tuple[str, int]]:
        """Store this sweep's suspects; returns the previous sweep's."""
        members = [f"{job} {batch}" for job, batch in suspects]
        with self.r.pipeline() as p:
            p.smembers(keys.SWEEP_SUSPECTS)
            p.delete(keys.SWEEP_SUSPECTS)
            if members:
                p.sadd(keys.SWEEP_SUSPECTS, *members)
                p.pexpire(keys.SWEEP_SUSPECTS, ttl_ms)
            previous = p.execute()[0]
        return {(job, int(batch)) for job, batch in (raw.decode().split() for raw in previous)}

    # The streamed export (producer/follow.py): one exporter a job, parts committed in order.

    def take_export(self, job_id: str, token: str, *, lease_ms: int, directory: str, fmt: str) -> ExportLease:
        """The job's exporter lease, bound to ``directory`` and ``fmt`` (see :class:`ExportLease`)."""
        got = self._take_export(keys=[self._job(job_id), keys.export_lock(job_id), keys.export_cursor(job_id)],
                                args=[token, lease_ms, directory, fmt, self.ttl_s])
        code = int(got[0])
        if code == -1:
            raise job_not_found(job_id)
        if code == -2:
            return ExportLease("held", held_ms=int(got[1]))
        if code == -3:
            return ExportLease("bound", directory=got[1].decode(), fmt=got[2].decode())
        return ExportLease("taken", part=code, directory=directory, fmt=fmt)

    def renew_export(self, job_id: str, token: str, *, lease_ms: int) -> bool:
        return bool(self._renew(keys=[keys.export_lock(job_id)], args=[token, lease_ms]))

    def release_export(self, job_id: str, token: str) -> None:
        self._release(keys=[keys.export_lock(job_id)], args=[token])

    def results_in_redis(self, job_id: str) -> int:
        """How many results wait in the results hash (not yet exported)."""
        return int(self.r.hlen(keys.results(job_id)))

    def take_results(self, job_id: str, limit: int, *, count: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` results from the results hash, lowest indices of what one HSCAN pass found first;
        they stay in Redis until :meth:`commit_export` (HSCAN may repeat a field: dedup by index)."""
        found: dict[int, bytes] = {}
        cursor = 0
        while True:
            cursor, fields = self.r.hscan(keys.results(job_id), cursor, count=count)
            found.update((int(k), v) for k, v in fields.items())  # type: ignore[union-attr,misc]  # bytes
            if cursor == 0 or len(found) >= limit:
                break
        return [json.loads(found[i]) for i in sorted(found)[:limit]]

    def commit_export(self, job_id: str, token: str, part: int, indices: Sequence[int]) -> int:
        """Part ``part`` (on disk, fsynced) holds ``indices``: drop their results from Redis, set their bits and
        move the cursor past it, atomically. Returns the next part. Raises :class:`ExportLeaseLost` if another
        exporter holds the job now (nothing changed), :class:`JobNotFoundError` if the job is gone."""
        got = self._commit_export(
            keys=[self._job(job_id), keys.results(job_id), keys.exported(job_id), keys.export_cursor(job_id),
                  keys.export_lock(job_id)],
            args=[token, part, self.ttl_s, *indices])
        code = int(got[0])
        if code == -1:
            raise job_not_found(job_id)
        if code == -2:
            raise ExportLeaseLost(f"job {job_id}: this exporter's lease expired and another `imgq results --follow` "
                                  f"took over before part {part} was committed; that one goes on")
        if code == -3:
            if int(got[1]) == part + 1:  # our own commit, retried after its reply was lost
                return part + 1
            raise ExportLeaseLost(f"job {job_id}: the export cursor is at part {int(got[1])}, not {part}: another "
                                  "exporter moved it")
        return code

    def export_state(self, job_id: str) -> dict[str, str]:
        """The export cursor: ``part`` (the next part), ``dir``, ``format``, ``records``; {} if never followed."""
        raw: dict[bytes, bytes] = self.r.hgetall(keys.export_cursor(job_id))  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def iter_results(self, job_id: str, total: int, chunk: int = 5000) -> Iterator[dict[str, Any] | None]:
        """Results in input order; None where an index has no result yet."""
        key = keys.results(job_id)
        for start in range(0, total, chunk):
            fields = [str(i) for i in range(start, min(start + chunk, total))]
            for raw in self.r.hmget(key, fields):
                yield None if raw is None else json.loads(raw)

    def results_at(self, job_id: str, indices: Sequence[int]) -> list[dict[str, Any] | None]:
        """The result records at these indices (one round trip); None where there is none."""
        raws = self.r.hmget(keys.results(job_id), [str(i) for i in indices])
        return [None if raw is None else json.loads(raw) for raw in raws]

    def unfinished(self, job_id: str, items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """The items that have no result yet, in Redis or exported (one round trip)."""
        done = self._done_at(job_id, [i for i, _ in items])
        return [item for item, d in zip(items, done, strict=True) if not d]

    def exported_at(self, job_id: str, indices: Sequence[int]) -> list[bool]:
        """Whether each index's result has left Redis for a part file (`imgq results --follow`)."""
        if not indices:
            return []
        ops = [arg for i in indices for arg in ("GET", "u1", i)]
        bits = self.r.execute_command("BITFIELD", keys.exported(job_id), *ops)  # type: ignore[no-untyped-call]
        return [bool(bit) for bit in bits]

    def _done_at(self, job_id: str, indices: Sequence[int]) -> list[bool]:
        """Whether each index has a result: in the results hash, or exported (one round trip)."""
        if not indices:
            return []
        with self.r.pipeline(transaction=False) as p:
            p.hmget(keys.results(job_id), [str(i) for i in indices])
            p.execute_command("BITFIELD", keys.exported(job_id),  # type: ignore[no-untyped-call]
                              *(a for i in indices for a in ("GET", "u1", i)))
            raws, bits = p.execute()
        return [raw is not None or bool(bit) for raw, bit in zip(raws, bits, strict=True)]

    def missing_indices(self, job_id: str, total: int, chunk: int = 5000, *, start: int = 0) -> list[int]:
        """The indices in [start, total) that have no result: what reconcile and `submit --resume` enqueue
        (they ask a window at a time, so memory stays flat)."""
        missing: list[int] = []
        for lo in range(start, total, chunk):
            window = range(lo, min(lo + chunk, total))
            missing += [i for i, done in zip(window, self._done_at(job_id, window), strict=True) if not done]
        return missing

    def recent_jobs(self, limit: int = 10) -> list[str]:
        return [raw.decode() for raw in self.r.zrevrange(keys.JOBS_INDEX, 0, limit - 1)]  # type: ignore[union-attr]
