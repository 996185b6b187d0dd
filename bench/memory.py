"""Resident memory of another process, sampled in the background: peak, and a timeline for flatness."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


class RssSampler:
    """``with RssSampler(pid) as s: ...`` then ``s.peak_mb``; samples every ``interval_s`` (children included)."""

    def __init__(self, pid: int, interval_s: float = 0.05, children: bool = False) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.children = children
        self.peak_mb = 0.0
        self.samples: list[tuple[float, float]] = []  # (monotonic s, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> float:
        try:
            procs = [self.proc, *(self.proc.children(recursive=True) if self.children else [])]
            mb = float(sum(p.memory_info().rss for p in procs)) / 2**20
        except psutil.Error:  # the process ended between two samples
            return self.peak_mb
        self.peak_mb = max(self.peak_mb, mb)
        self.samples.append((time.monotonic(), mb))
        return mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
