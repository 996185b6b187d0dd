"""Results written per 10-second window, counted in Redis: the throughput `imgq status` shows.

    imgq:written:<unix time // 10>   STRING   results written by any worker in that window; expires in 3 min

Workers add what they wrote with each batch's results; `imgq status` sums the last minute. It counts across every
worker and host that shares the Redis, which per-process Prometheus counters cannot do without a Prometheus.
"""

from __future__ import annotations

import time

import redis

from imgq import keys

BUCKET_S = 10
# Long enough to sum a full minute, short enough that the keys never pile up.
WINDOW_TTL_S = 180


def window_key(now: float | None = None) -> str:
    """The counter for the window ``now`` falls in; :meth:`imgq.jobs.JobStore.write_results` adds to it in the
    same Lua call that writes the results (no extra round trip per batch)."""
    return keys.written_window(int((time.time() if now is None else now) // BUCKET_S))


def written_last(client: redis.Redis, window_s: int = 60, *, now: float | None = None) -> int:
    """Results written in the last ``window_s`` seconds (to 10 s resolution, the current window included)."""
    current = int((time.time() if now is None else now) // BUCKET_S)
    windows = [keys.written_window(b) for b in range(current - window_s // BUCKET_S + 1, current + 1)]
    return sum(int(raw) for raw in client.mget(windows) if raw is not None)
