"""`imgq run`: one job on the embedded default, start to finish, with a summary.

The private Redis goes with the process, so an interrupted run cannot be resumed in place: Ctrl-C writes the
results that are done and the input items that have none (a URL list for a URL list; for a table, a JSONL
table of their URL and kept columns), to be run again.
"""

from __future__ import annotations

import json
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
from producer.reconcile import Scan, stall_repair
from producer.sources import Columns, kept_of
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
            remaining_path: Path | None = None, columns: Columns | None = None) -> RunReport:
    """``reread`` gives the URLs again, for re-enqueuing a stalled job's missing items (None: stdin);
    ``columns``: the table's URL and kept columns (None: a URL list).

    Ctrl-C (or SIGTERM) while waiting keeps what is done: the results that exist are written to ``out``,
    the URLs without one to ``remaining_path`` (when the input can be read again), and :class:`Interrupted`
    says so and how to finish the rest (the private Redis goes with this process, so the job cannot resume)."""
    require_champion(settings.model_dir, settings.env_name("model_dir"))
    # Submitting overlaps the workers' start-up; the private Redis goes with the run, so its workers are
    # killed rather than shut down warm once the results are out (imgq.local.LocalCluster).
    with LocalCluster(settings, workers=workers, concurrency=concurrency, wait_ready=False,
                      kill_on_stop=True) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=settings.job_ttl_s)
        try:
            start = time.monotonic()
            job_id = submit_urls(urls, settings=cluster.settings, store=store, app=cluster.app)
            repair = None if reread is None else stall_repair(job_id, reread, settings=cluster.settings,
                                                              store=store, app=cluster.app,
                                                              keep=columns.keep if columns else ())
            try:
                status = wait_for_job(store, job_id, progress=progress, alive=cluster.check_alive, repair=repair)
            except KeyboardInterrupt:
                # Stopped (killed: kill_on_stop) before the results are read: a result written while they are
                # read could land in neither the output nor the remaining file. Their Redis goes with this run.
                cluster.stop_workers()
                raise _keep_what_is_done(store, job_id, out, fmt, reread, output_name, remaining_path,
                                         columns) from None
            seconds = time.monotonic() - start
            summary = export_results(store, job_id, out, fmt)
        finally:
            store.r.close()
    return RunReport(job_id=job_id, total=status.total, summary=summary, seconds=seconds)


def _keep_what_is_done(store: JobStore, job_id: str, out: TextIO, fmt: str,
                       reread: Callable[[], Iterable[str]] | None, output_name: str,
                       remaining_path: Path | None, columns: Columns | None) -> Interrupted:
    summary = export_results(store, job_id, out, fmt)
    out.flush()
    total = summary.written + summary.missing
    kept = f"interrupted: job {job_id}: wrote the {summary.written} of {total} results that were done to {output_name}"
    if reread is None or remaining_path is None:
        return Interrupted(f"{kept}; the other {summary.missing} URLs have no result: run them again with "
                           "`imgq run URLS` (the indices missing from the output)")
    # Streamed, a window of indices at a time: the input may be far larger than memory.
    with open(remaining_path, "w", encoding="utf-8") as fh:
        for _, url in Scan(store, store.status(job_id), reread(), check=False):
            fh.write(_remaining_line(url, columns) + "\n")
    again = "" if columns is None else columns.option_text()
    return Interrupted(f"{kept}; the other {summary.missing} URLs are in {remaining_path}: finish them with "
                       f"`imgq run {remaining_path}{again} -o REST.jsonl`")


def _remaining_line(url: str, columns: Columns | None) -> str:
    """An item without a result, as a line of the remaining file: the URL, or a JSONL row of a table's URL and
    kept columns (so the rerun keeps them)."""
    if columns is None:
        return str(url)
    return json.dumps({columns.url: str(url), **kept_of(url)}, separators=(",", ":"), ensure_ascii=False)
