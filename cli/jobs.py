"""`imgq run|submit|status|reconcile|report|results`: the commands that send jobs and read them back."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.options import add_common, output_args, settings_from, store_for


def cmd_run(args: argparse.Namespace) -> int:
    from producer.run import open_output, run_job  # keep `imgq status` free of torch
    from producer.sources import read_urls, rereader

    settings = settings_from(args)
    out = open_output(args.output)
    try:
        report = run_job(read_urls(args.urls), out, settings=settings, workers=args.workers,
                         concurrency=args.concurrency, fmt=args.format, progress=not args.quiet,
                         reread=rereader(args.urls))
    finally:
        if out is not sys.stdout:
            out.close()
    print(report.describe(), file=sys.stderr)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from imgq.celery_app import create_app
    from producer.sources import read_urls, rereader
    from producer.submit import EnqueueError, submit_urls

    settings = settings_from(args)
    store = store_for(settings)
    app = create_app(settings)
    try:
        job_id = submit_urls(read_urls(args.urls), settings=settings, store=store, app=app)
    except EnqueueError as exc:
        print(exc.job_id)  # part of the job was accepted: still hand scripts its id (for `imgq reconcile`)
        raise
    if args.wait:
        from producer.export import export_results
        from producer.reconcile import stall_repair
        from producer.run import open_output
        from producer.wait import wait_for_job

        reread = rereader(args.urls)
        repair = None if reread is None else stall_repair(job_id, reread, settings=settings, store=store, app=app)
        wait_for_job(store, job_id, progress=True, repair=repair)
        out = open_output(args.output)
        try:
            export_results(store, job_id, out, args.format)
        finally:
            if out is not sys.stdout:
                out.close()
    print(job_id)  # last line of stdout: scripts capture it
    return 0


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
    from producer.sources import read_urls

    settings = settings_from(args)
    report = reconcile_job(args.job, read_urls(args.urls), settings=settings, store=store_for(settings),
                           app=create_app(settings), dry_run=args.dry_run, source=args.urls)
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
    print(f"imgq: wrote {args.output}: {summary.items} items, {summary.thumbnails} thumbnails", file=sys.stderr)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from producer.export import export_results
    from producer.run import open_output

    out = open_output(args.output)
    try:
        if args.below is not None:
            from producer.export import export_review

            fmt = "jsonl" if args.output and str(args.output).endswith(".jsonl") else "csv"
            n = export_review(store_for(settings_from(args)), args.job, out, args.below, fmt)
            print(f"imgq: {n} items below confidence {args.below:g} (a manifest: fix labels, then "
                  "`imgq retrain --data FILE`)", file=sys.stderr)
            return 0
        summary = export_results(store_for(settings_from(args)), args.job, out, args.format)
    finally:
        if out is not sys.stdout:
            out.close()
    if summary.missing:
        print(f"imgq: {summary.missing} items have no result yet (job still running?)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="classify a URL file on the embedded default (local Redis + workers)")
    p.add_argument("urls", help="URL file, one per line; - for stdin")
    output_args(p)
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--concurrency", type=int, help="tasks in flight per worker (IMGQ_CONCURRENCY)")
    p.add_argument("--batch-size", type=int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_common(p, model=True, fetch=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a URL file to a running deployment (IMGQ_REDIS_URL)")
    p.add_argument("urls", help="URL file, one per line; - for stdin")
    p.add_argument("--batch-size", type=int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("--wait", action="store_true", help="show progress, then write the results")
    output_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a job's progress; without JOB, the deployment's")
    p.add_argument("job", nargs="?", help="job id (omit: queues, live workers, throughput, champion, recent jobs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reconcile", help="enqueue again a job's items that have no result (e.g. after Redis lost data)")
    p.add_argument("job")
    p.add_argument("urls", help="the URL file the job was submitted from (URLs are not kept in Redis); - for stdin")
    p.add_argument("--batch-size", type=int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("--dry-run", action="store_true", help="only count the items that have no result")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("report", help="a self-contained HTML page of a job: thumbnails, labels, filters")
    p.add_argument("job")
    p.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file (default report.html)")
    p.add_argument("--limit", type=int, default=2000, help="items shown as cards (counts cover the whole job)")
    add_common(p, fetch=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", help="export a job's results in input order")
    p.add_argument("job")
    output_args(p)
    p.add_argument("--below", type=float, metavar="CONF",
                   help="only labelled items under this confidence, as a url,label manifest for review")
    p.set_defaults(func=cmd_results)

