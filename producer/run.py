"""`imgq run`: one job on the embedded default, start to finish, with a summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from imgq.errors import Interrupted
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
            concurrency: int | None = None, fmt: str = "jsonl", progress: bool | None = None,
            reread: Callable[[], Iterable[str]] | None = None, output_name: str = "stdout",
            remaining_path: Path | None = None) -> RunReport:
    """``reread`` gives the URLs again, for re-enqueuing a stalled job's missing items (None: stdin).

    Ctrl-C (or SIGTERM) while waiting keeps what is done: the results that exist are written to ``out``,
    the URLs without one to ``remaining_path`` (when the input can be read again), and :class:`Interrupted`
    says so and how to finish the rest (the private Redis goes with this process, so the job cannot resume)."""
    require_champion(settings.model_dir, settings.env_name("model_dir"))
    with LocalCluster(settings, workers=workers, concurrency=concurrency) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=settings.job_ttl_s)
        try:
            start = time.monotonic()
            job_id = submit_urls(urls, settings=cluster.settings, store=store, app=cluster.app)
            repair = None if reread is None else stall_repair(job_id, reread, settings=cluster.settings,
                                                              store=store, app=cluster.app)
            try:
                status = wait_for_job(store, job_id, progress=progress, alive=cluster.check_alive, repair=repair)
            except KeyboardInterrupt:
                raise _keep_what_is_done(store, job_id, out, fmt, reread, output_name, remaining_path) from None
            seconds = time.monotonic() - start
            summary = export_results(store, job_id, out, fmt)
        finally:
            store.r.close()
    return RunReport(job_id=job_id, total=status.total, summary=summary, seconds=seconds)


def _keep_what_is_done(store: JobStore, job_id: str, out: TextIO, fmt: str,
                       reread: Callable[[], Iterable[str]] | None, output_name: str,
                       remaining_path: Path | None) -> Interrupted:
    summary = export_results(store, job_id, out, fmt)
    out.flush()
    total = summary.written + summary.missing
    kept = f"interrupted: job {job_id}: wrote the {summary.written} of {total} results that were done to {output_name}"
    if reread is None or remaining_path is None:
        return Interrupted(f"{kept}; the other {summary.missing} URLs have no result: run them again with "
                           "`imgq run URLS` (the indices missing from the output)")
    done = {i for i, r in enumerate(store.iter_results(job_id, total)) if r is not None}
    with open(remaining_path, "w", encoding="utf-8") as fh:
        for i, url in enumerate(reread()):
            if i not in done:
                fh.write(url + "\n")
    return Interrupted(f"{kept}; the other {summary.missing} URLs are in {remaining_path}: finish them with "
                       f"`imgq run {remaining_path} -o REST.jsonl`")
