"""`imgq submit` of 1,000,000 URLs into a private redis-server, no workers: wall time and peak memory.

The real command in its own process (``python -m cli submit FILE``), its RSS sampled with psutil.
Backpressure is lifted (``IMGQ_MAX_QUEUE_DEPTH``): with no workers the queue only grows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.memory import RssSampler
from imgq import keys
from imgq.redis_server import RedisServer
from imgq.settings import Settings


@dataclass(frozen=True)
class EnqueueResult:
    urls: int
    seconds: float
    peak_rss_mb: float
    rss_at_10pct_mb: float  # memory flat: RSS a tenth of the way in vs the peak
    messages: int


def write_url_file(path: Path, count: int, base: str = "http://images.example.com") -> Path:
    if not path.exists() or sum(1 for _ in path.open("rb")) != count:
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            fh.writelines(f"{base}/photos/{i // 1000:04d}/img_{i:07d}.jpg\n" for i in range(count))
        tmp.replace(path)
    return path


def measure_enqueue(url_file: Path, count: int, queue_depth: int = 10_000_000) -> EnqueueResult:
    with RedisServer() as server:
        env = {**os.environ, "IMGQ_REDIS_URL": server.url, "IMGQ_MAX_QUEUE_DEPTH": str(queue_depth)}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "cli", "submit", str(url_file)], env=env,
                                stdout=subprocess.PIPE, text=True)
        with RssSampler(proc.pid, interval_s=0.02) as sampler:
            out, _ = proc.communicate()
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"imgq submit exited with {proc.returncode}")
        job_id = out.strip().splitlines()[-1]
        client = redis.Redis.from_url(server.url)
        total = int(client.hget(keys.job(job_id), "total") or 0)
        messages = int(client.llen(Settings.from_env().classify_queue))
        client.close()
    if total != count:
        raise RuntimeError(f"imgq submit enqueued {total} URLs, expected {count}")
    t0 = sampler.samples[0][0]
    early = [mb for t, mb in sampler.samples if t - t0 >= 0.1 * seconds]
    return EnqueueResult(urls=total, seconds=seconds, peak_rss_mb=sampler.peak_mb,
                         rss_at_10pct_mb=early[0] if early else sampler.peak_mb, messages=messages)
