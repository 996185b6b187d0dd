"""imgq end to end: submit to last result through a private Redis and real `imgq worker` processes.

Throughput (submit to last result), one-URL job latency with a warm worker, and the worker's memory: its
peak, and its RSS before and after a long run (flat memory means no per-image leak).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from bench.memory import RssSampler, rss_mb
from imgq import keys
from imgq.jobs import JobStore
from imgq.local import LocalCluster
from imgq.settings import Settings
from producer.submit import submit_urls


@dataclass
class E2EResult:
    ips: float
    images: int
    seconds: float
    one_url_p50_ms: float
    one_url_p99_ms: float
    worker_peak_rss_mb: float
    rss_start_mb: float
    rss_end_mb: float
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    job_start: float = 0.0  # monotonic, as the samples
    job_end: float = 0.0
    # CPU time per image during the throughput job, per process: where the cores went.
    cpu_ms_per_image: dict[str, float] = field(default_factory=dict)
    # The whole machine's idle share during the throughput job: near 0 means imgq kept the cores busy (or
    # something else did); well above 0 means the pipeline stalled.
    machine_idle_pct: float = 0.0

    @property
    def cpu_busy_pct(self) -> float:
        """How busy the cores were with the processes measured: under 100 means the pipeline stalled."""
        return 100.0 * sum(self.cpu_ms_per_image.values()) * self.ips / 1000 / (os.cpu_count() or 1)

    def rss_timeline(self) -> dict[str, float]:
        """Worker RSS (MB) at 10%, 50% and 90% of the throughput job, by time."""
        during = [(t, mb) for t, mb in self.rss_samples if self.job_start <= t <= self.job_end]
        if not during:
            return {}
        span = self.job_end - self.job_start
        return {f"{pct}%": round(min(during, key=lambda s: abs(s[0] - self.job_start - pct / 100 * span))[1], 1)
                for pct in (10, 50, 90)}

    @property
    def rss_growth_pct(self) -> float:
        return 100.0 * (self.rss_end_mb - self.rss_start_mb) / self.rss_start_mb


def wait_done(store: JobStore, job_id: str, total: int, timeout_s: float, poll_s: float) -> None:
    """Poll the results count; finer-grained than producer.wait, so latencies are not rounded to 200 ms."""
    key = keys.results(job_id)
    deadline = time.monotonic() + timeout_s
    while store.r.hlen(key) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: {store.r.hlen(key)}/{total} results after {timeout_s:g} s")
        time.sleep(poll_s)


def run_job(cluster: LocalCluster, store: JobStore, urls: Sequence[str], *, timeout_s: float = 600,
            poll_s: float = 0.01) -> float:
    """Seconds from the start of submission to the last result."""
    start = time.perf_counter()
    job_id = submit_urls(urls, settings=cluster.settings, store=store, app=cluster.app)
    wait_done(store, job_id, len(urls), timeout_s, poll_s)
    seconds = time.perf_counter() - start
    cluster.check_alive()
    return seconds


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[name] = t.user + t.system
    return out


def _idle_pct(before: Any, after: Any) -> float:
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    return 100.0 * idle / total if total > 0 else 0.0


def measure_e2e(settings: Settings, urls: Sequence[str], *, latency_jobs: int, warmup: int = 64,
                other_pids: dict[str, int] | None = None) -> E2EResult:
    with LocalCluster(settings, workers=1) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=3600)
        pid = cluster.workers[0].proc.pid
        assert cluster.redis is not None and cluster.redis.proc is not None
        pids = {"worker": pid, "redis": cluster.redis.proc.pid, "bench": os.getpid(), **(other_pids or {})}
        try:
            with RssSampler(pid, interval_s=0.1) as sampler:
                run_job(cluster, store, urls[:warmup])  # connections, allocator and kernels warm
                rss_start = rss_mb(pid)
                cpu_before, machine_before = _cpu_s(pids), psutil.cpu_times()
                job_start = time.monotonic()
                seconds = run_job(cluster, store, urls, poll_s=0.05)  # 50 ms polls: ~0 CPU, <1% error
                job_end = time.monotonic()
                cpu_after, machine_after = _cpu_s(pids), psutil.cpu_times()
                rss_end = rss_mb(pid)
                latencies = []
                for i in range(latency_jobs):
                    latencies.append(1000 * run_job(cluster, store, [urls[i % len(urls)]], poll_s=0.002))
        finally:
            store.r.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return E2EResult(ips=len(urls) / seconds, images=len(urls), seconds=seconds,
                     one_url_p50_ms=statistics.median(latencies), one_url_p99_ms=p99,
                     worker_peak_rss_mb=sampler.peak_mb, rss_start_mb=rss_start, rss_end_mb=rss_end,
                     rss_samples=sampler.samples, job_start=job_start, job_end=job_end,
                     cpu_ms_per_image={k: round(1000 * (cpu_after[k] - cpu_before[k]) / len(urls), 3) for k in pids},
                     machine_idle_pct=_idle_pct(machine_before, machine_after))
