"""`imgq run|submit|status|reconcile|report|results`: the commands that send jobs and read them back.

None of them imports torch (tests/test_cli_errors.py checks): the producer side never needs the model.
stdout carries data only (a job id, results, a status); progress, notes and errors go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.options import (
    add_common,
    columns_from,
    output_args,
    positive_int,
    progress_from,
    quiet_args,
    settings_from,
    store_for,
    table_args,
)
from imgq.errors import Interrupted
from imgq.jobs import JobStore
from imgq.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from producer.sources import Columns


def note(args: argparse.Namespace, line: str) -> None:
    """An informational line on stderr; -q silences it."""
    if not getattr(args, "quiet", False):
        print(f"imgq: {line}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from producer.export import open_output
    from producer.run import run_job
    from producer.sources import first_url, read_items, rereader

    settings = settings_from(args)
    columns = columns_from(args)
    # A missing or empty file, or a table without the columns, fails before anything starts.
    urls = first_url(read_items(args.urls, columns), args.urls)
    to_file = args.output is not None and str(args.output) != "-"
    remaining = ".remaining.txt" if columns is None else ".remaining.jsonl"
    out = open_output(args.output)
    try:
        report = run_job(urls, out, settings=settings, workers=args.workers, concurrency=args.concurrency,
                         fmt=args.format, progress=progress_from(args), reread=rereader(args.urls, columns),
                         output_name=str(args.output) if to_file else "stdout",
                         remaining_path=args.output.with_suffix(remaining) if to_file else None, columns=columns)
    finally:
        if out is not sys.stdout:
            out.close()
    print(report.describe(), file=sys.stderr)  # the outcome of the command: kept with -q
    return 0


class _SubmitStore(JobStore):
    """A job store that remembers the job it created, so that a Ctrl-C mid-submission can name it."""

    created: str | None = None

    def create_job(self, meta: dict[str, str] | None = None, **kwargs: Any) -> str:
        self.created = super().create_job(meta, **kwargs)
        return self.created


def cmd_submit(args: argparse.Namespace) -> int:
    from imgq.celery_app import create_app
    from producer.export import export_results, open_output
    from producer.sources import first_url, read_items, rereader
    from producer.submit import EnqueueError, submit_urls

    settings = settings_from(args)
    columns = columns_from(args)
    keep = columns.keep if columns else ()
    urls = first_url(read_items(args.urls, columns), args.urls)  # unreadable, empty, no such column: no job
    store = _SubmitStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s, timeout_s=settings.redis_timeout_s)
    store.r.ping()  # an unreachable Redis or a wrong password: one line from cli.main, before anything
    out = open_output(args.output) if args.wait else None  # a results file that cannot be written: fail now
    app = create_app(settings)
    reread = rereader(args.urls, columns)
    try:
        try:
            if args.resume is not None:
                job_id = _resume(args, urls, reread, keep, settings=settings, store=store, app=app)
            else:
                job_id = submit_urls(urls, settings=settings, store=store, app=app)
        except EnqueueError as exc:
            print(exc.job_id)  # part of the job was accepted: still hand scripts its id (for `imgq reconcile`)
            raise
        except KeyboardInterrupt:
            if args.resume is not None:
                print(args.resume)
                raise Interrupted(f"interrupted while resuming job {args.resume}: what was enqueued stays; run the "
                                  "same command again to enqueue the rest") from None
            raise _submission_interrupted(store, args.urls, columns) from None
        if not args.wait:
            print(job_id)  # the only line on stdout: scripts capture it
            return 0
        assert out is not None
        if out is sys.stdout:
            print(f"imgq: job {job_id}", file=sys.stderr, flush=True)  # stdout is the results'
        from producer.reconcile import stall_repair
        from producer.wait import wait_for_job

        repair = None if reread is None else stall_repair(job_id, reread, settings=settings, store=store, app=app,
                                                          keep=keep)
        try:
            wait_for_job(store, job_id, progress=progress_from(args), repair=repair)
        except KeyboardInterrupt:
            status = store.status(job_id)
            raise Interrupted(f"stopped waiting: job {job_id} goes on in the deployment ({status.done}/"
                              f"{status.total} done); follow it with `imgq status {job_id}`, then "
                              f"`imgq results {job_id} -o FILE`") from None
        export_results(store, job_id, out, args.format)
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
        app.close()
    if out is not sys.stdout:
        print(job_id)  # results went to the file: the job id is stdout's one line
    return 0


def _resume(args: argparse.Namespace, urls: Iterable[str], reread: Callable[[], Iterable[str]] | None,
            keep: Sequence[str], *, settings: Settings, store: JobStore, app: Celery) -> str:
    """`imgq submit --resume JOB INPUT`: enqueue what the job has no result for (a reconcile); the job id."""
    from producer.reconcile import reconcile_job

    report = reconcile_job(args.resume, urls, settings=settings, store=store, app=app, keep=keep, reread=reread,
                           source="stdin" if args.urls == "-" else args.urls)
    note(args, report.describe())
    return str(args.resume)


def _submission_interrupted(store: _SubmitStore, source: str, columns: Columns | None) -> Interrupted:
    job_id = store.created
    if job_id is None:
        return Interrupted("interrupted before a job was created: nothing was submitted")
    print(job_id)  # as after any submission that got this far: scripts capture it
    accepted = store.status(job_id).total
    again = "URLS (the same URL file)" if source == "-" else source
    flags = "" if columns is None else columns.option_text()
    return Interrupted(f"interrupted: job {job_id} accepted the first {accepted} URLs, which will be classified; "
                       f"enqueue the rest with `imgq reconcile {job_id} {again}{flags}`")


def cmd_status(args: argparse.Namespace) -> int:
    if args.job is None:
        return _overview(args)
    store = store_for(settings_from(args))
    status = store.status(args.job)
    if args.json:
        print(json.dumps(status.to_dict()))
    else:
        for key, value in status.to_dict().items():
            print(f"{key:>12}: {value}")
        for dead in store.dead_batches(args.job) if status.dead_batches else []:
            print(f"  dead batch {dead['batch']}: {len(dead['indices'])} items ended as worker_lost after "
                  f"{dead['deliveries']} deliveries (indices {', '.join(map(str, dead['indices'][:8]))}"
                  f"{', ...' if len(dead['indices']) > 8 else ''})")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from imgq.celery_app import create_app
    from producer.reconcile import reconcile_job
    from producer.sources import read_items, rereader

    settings = settings_from(args)
    columns = columns_from(args)
    urls = read_items(args.urls, columns)  # a file that cannot be read fails here, before Redis is asked anything
    app = create_app(settings)
    try:
        report = reconcile_job(args.job, urls, settings=settings, store=store_for(settings), app=app,
                               dry_run=args.dry_run, source=args.urls, keep=columns.keep if columns else (),
                               reread=rereader(args.urls, columns))
    finally:
        app.close()
    print(report.describe())
    return 0


def _overview(args: argparse.Namespace) -> int:
    from imgq.celery_app import create_app
    from producer.overview import collect_overview, format_overview

    settings = settings_from(args)
    app = create_app(settings)
    try:
        overview = collect_overview(settings, store_for(settings), app)
    finally:
        app.close()
    print(json.dumps(overview.to_dict()) if args.json else format_overview(overview))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from producer.html_report import write_report

    settings = settings_from(args)
    summary = write_report(settings, store_for(settings), args.job, args.output, limit=args.limit)
    note(args, f"wrote {args.output}: {summary.items} items, {summary.thumbnails} thumbnails")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from producer.export import export_results, format_for, open_output

    # A part directory has no extension to go by: --follow writes parquet unless told otherwise.
    fmt = "parquet" if args.follow and args.format is None else format_for(args.output, args.format)
    to_stdout = args.output is None or str(args.output) == "-"
    if args.follow and (to_stdout or args.below is not None or args.summary):
        args.usage("--follow needs -o DIR (a directory for the part files), without --below or --summary")
    if args.follow and fmt not in ("parquet", "jsonl"):
        args.usage(f"--follow writes parquet or jsonl parts, not {fmt}")
    if fmt == "parquet" and to_stdout and not args.summary:
        args.usage("parquet goes to a file: give -o FILE.parquet")
    settings = settings_from(args)
    store = store_for(settings)
    status = store.status(args.job)  # an unknown job fails before an output file is created
    if args.follow:
        return _follow(args, store, fmt, lease_s=settings.lease_s)
    if status.exported and not args.summary:
        where = store.export_state(args.job).get("dir", "?")
        note(args, f"{status.exported} results already left Redis for the part files in {where} (`imgq results "
             f"{args.job} --follow`); this export has the rest")
    if fmt == "parquet" and not args.summary and args.below is None:
        from producer.export import export_parquet

        _missing_note(args, export_parquet(store, args.job, args.output).missing)
        return 0
    if args.summary:
        summary = export_results(store, args.job, None)
        print(json.dumps(summary.to_dict()) if args.json else summary.describe())
        return 0
    out = open_output(args.output)
    try:
        if args.below is not None:
            from producer.export import export_review

            fmt = "jsonl" if args.output and str(args.output).endswith(".jsonl") else "csv"
            n = export_review(store, args.job, out, args.below, fmt)
            note(args, f"{n} items below confidence {args.below:g} (a manifest: fix labels, then "
                 "`imgq retrain --data FILE`)")
            return 0
        summary = export_results(store, args.job, out, fmt)
    finally:
        if out is not sys.stdout:
            out.close()
    _missing_note(args, summary.missing)
    return 0


def _missing_note(args: argparse.Namespace, missing: int) -> None:
    if missing:
        print(f"imgq: {missing} items have no result yet (job still running? see `imgq status {args.job}`)",
              file=sys.stderr)


def _follow(args: argparse.Namespace, store: JobStore, fmt: str, *, lease_s: float) -> int:
    from producer.follow import follow_job

    def on_part(path: Path, records: int) -> None:
        print(path, flush=True)  # committed: final, and its results have left Redis

    try:
        report = follow_job(store, args.job, args.output, fmt=fmt, part_size=args.part_size, lease_s=lease_s,
                            on_part=on_part, on_note=lambda line: note(args, line))
    except KeyboardInterrupt:
        raise Interrupted(f"stopped following job {args.job}: every part printed is complete; run the same "
                          "command again to go on from there") from None
    note(args, report.describe())
    return 0


_INPUT_HELP = ("URL file, one per line (- for stdin), or a table: .csv, .tsv, .jsonl or .parquet with a URL column "
               "(--url-column)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="classify a URL file on the embedded default (local Redis + workers)")
    p.add_argument("urls", help=_INPUT_HELP)
    table_args(p)
    output_args(p)
    p.add_argument("--workers", type=positive_int, default=1, help="local worker processes")
    p.add_argument("--concurrency", type=positive_int, help="tasks in flight per worker (IMGQ_CONCURRENCY)")
    p.add_argument("--batch-size", type=positive_int, help="URLs per message (IMGQ_BATCH_SIZE)")
    quiet_args(p, progress=True)
    add_common(p, model=True, fetch=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a URL file to a running deployment (IMGQ_REDIS_URL)")
    p.add_argument("urls", help=_INPUT_HELP)
    table_args(p)
    p.add_argument("--resume", metavar="JOB",
                   help="enqueue only the items of job JOB (submitted from this input) that have no result: after "
                        "a crash, a Ctrl-C or an expired job")
    p.add_argument("--batch-size", type=positive_int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("--wait", action="store_true",
                   help="wait, then write the results (to stdout, the job id then going to stderr; or to -o)")
    output_args(p)
    quiet_args(p, progress=True)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a job's progress; without JOB, the deployment's")
    p.add_argument("job", nargs="?", help="job id (omit: queues, live workers, throughput, champion, recent jobs)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reconcile", help="enqueue again a job's items that have no result (e.g. after Redis lost data)")
    p.add_argument("job")
    p.add_argument("urls", help="the URL file or table the job was submitted from (URLs are not kept in Redis), "
                                "with the same --url-column and --keep; - for stdin")
    table_args(p)
    p.add_argument("--batch-size", type=positive_int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("--dry-run", action="store_true", help="only count the items that have no result")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("report", help="a self-contained HTML page of a job: thumbnails, labels, filters")
    p.add_argument("job")
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file (default report.html)")
    p.add_argument("--limit", type=positive_int, default=2000, help="items shown as cards (counts cover the whole job)")
    quiet_args(p)
    add_common(p, fetch=True)
    p.set_defaults(func=cmd_report)

    from producer.follow import PART_SIZE

    p = sub.add_parser("results", help="export a job's results in input order")
    p.add_argument("job")
    output_args(p, formats=("jsonl", "csv", "parquet"), default=None)
    p.add_argument("--follow", action="store_true",
                   help="stream: write results into part files in -o DIR as they finish, removing them from Redis, "
                        "until the job is done (parquet by default, or --format jsonl); run again to resume")
    p.add_argument("--part-size", type=positive_int, default=PART_SIZE, metavar="N",
                   help=f"with --follow: records a part file (default {PART_SIZE}; Redis holds at most about this "
                        "many finished results of the job)")
    p.add_argument("--below", type=float, metavar="CONF",
                   help="only labelled items under this confidence, as a url,label manifest for review")
    p.add_argument("--summary", action="store_true", help="counts only: results, missing, labels, error codes")
    p.add_argument("--json", action="store_true", help="with --summary: one JSON object")
    quiet_args(p)
    p.set_defaults(func=cmd_results, usage=p.error)
