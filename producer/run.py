"""`imgq run`: one job on the embedded default, start to finish, with a summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from imgq.jobs import JobStore
from imgq.local import LocalCluster
from imgq.settings import Settings
from model.pointer import require_champion
from producer.export import ExportSummary, export_results
from producer.reconcile import stall_repair
from producer.submit import submit_urls
from producer.wait import wait_for_job


@dataclass
class RunReport:
    job_id: str
    total: int
    summary: ExportSummary
    seconds: float  # submit to last result

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        errors = ", ".join(f"{code}={n}" for code, n in sorted(self.summary.errors.items())) or "none"
        return (f"job {self.job_id}: {self.total} URLs, {self.summary.labelled} labelled, "
                f"{sum(self.summary.errors.values())} errors ({errors}); "
                f"{self.seconds:.2f} s, {self.images_per_s:.1f} images/s")


def run_job(urls: Iterable[str], out: TextIO, *, settings: Settings, workers: int = 1,
            concurrency: int | None = None, fmt: str = "jsonl", progress: bool = True,
            reread: Callable[[], Iterable[str]] | None = None) -> RunReport:
    """``reread`` gives the URLs again, for re-enqueuing a stalled job's missing items (None: stdin)."""
    require_champion(settings.model_dir, settings.env_name("model_dir"))
    with LocalCluster(settings, workers=workers, concurrency=concurrency) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=settings.job_ttl_s)
        try:
            start = time.monotonic()
            job_id = submit_urls(urls, settings=cluster.settings, store=store, app=cluster.app)
            repair = None if reread is None else stall_repair(job_id, reread, settings=cluster.settings,
                                                              store=store, app=cluster.app)
            status = wait_for_job(store, job_id, progress=progress, alive=cluster.check_alive, repair=repair)
            seconds = time.monotonic() - start
            summary = export_results(store, job_id, out, fmt)
        finally:
            store.r.close()
    return RunReport(job_id=job_id, total=status.total, summary=summary, seconds=seconds)


def open_output(path: Path | None) -> TextIO:
    if path is None or str(path) == "-":
        return sys.stdout
    return open(path, "w", encoding="utf-8", newline="")
