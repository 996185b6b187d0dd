"""The `imgq` command line (also `python -m producer`). Handlers are thin: parse, call, print."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imgq.errors import ImgqError
from imgq.jobs import JobStore
from imgq.settings import DEVICES, Settings


def _settings(args: argparse.Namespace) -> Settings:
    allow = tuple(getattr(args, "allow_network", None) or ())
    base = Settings.from_env()
    return base.replace(
        model_dir=getattr(args, "model_dir", None),
        device=getattr(args, "device", None),
        batch_size=getattr(args, "batch_size", None),
        concurrency=getattr(args, "concurrency", None),
        allow_networks=tuple(sorted({*base.allow_networks, *allow})) if allow else None,
    )


def _store(settings: Settings) -> JobStore:
    return JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)


def cmd_run(args: argparse.Namespace) -> int:
    from producer.run import open_output, run_job  # keep `imgq status` free of torch
    from producer.urls import read_urls, rereader

    settings = _settings(args)
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
    from producer.submit import EnqueueError, submit_urls
    from producer.urls import read_urls, rereader
    from worker.app import create_app

    settings = _settings(args)
    store = _store(settings)
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
    store = _store(_settings(args))
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
    from producer.reconcile import reconcile_job
    from producer.urls import read_urls
    from worker.app import create_app

    settings = _settings(args)
    report = reconcile_job(args.job, read_urls(args.urls), settings=settings, store=_store(settings),
                           app=create_app(settings), dry_run=args.dry_run, source=args.urls)
    print(report.describe())
    return 0


def _overview(args: argparse.Namespace) -> int:
    from producer.overview import collect_overview, format_overview
    from worker.app import create_app

    settings = _settings(args)
    app = create_app(settings)
    try:
        overview = collect_overview(settings, _store(settings), app)
    finally:
        app.close()
    print(json.dumps(overview.to_dict()) if args.json else format_overview(overview))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from producer.report import write_report

    settings = _settings(args)
    summary = write_report(settings, _store(settings), args.job, args.output, limit=args.limit)
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
            n = export_review(_store(_settings(args)), args.job, out, args.below, fmt)
            print(f"imgq: {n} items below confidence {args.below:g} (a manifest: fix labels, then "
                  "`imgq retrain --data FILE`)", file=sys.stderr)
            return 0
        summary = export_results(_store(_settings(args)), args.job, out, args.format)
    finally:
        if out is not sys.stdout:
            out.close()
    if summary.missing:
        print(f"imgq: {summary.missing} items have no result yet (job still running?)", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.gpus or args.processes is not None:
        from producer.supervisor import run_workers  # never imports torch: CUDA stays untouched here

        if args.name:
            raise ImgqError("--name names one worker; with --gpus/--processes they are gpu<id>@%h / cpu<i>@%h")
        return run_workers(settings, gpus=args.gpus, processes=args.processes, queues=args.queues,
                           loglevel=args.loglevel)
    # The worker process reads its settings from the environment (worker.app), once: hand the
    # CLI's overrides over that way.
    os.environ.update(settings.to_env())
    from model.registry import champion_version

    queues = args.queues or settings.classify_queue
    if settings.classify_queue in queues.split(",") and champion_version(settings.model_dir) is None:
        raise ImgqError(f"no model in {settings.model_dir} ({settings.env_name('model_dir')}); "
                        "train one first: imgq train --data demo")
    from worker.app import EXIT_RETRY, app, stop_was_requested

    argv = ["worker", f"--loglevel={args.loglevel}", "-Q", queues, "-c", str(settings.concurrency)]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)  # returns when the worker stops; Celery's exit code is not handed back
    if stop_was_requested():
        return 0
    # Stopped on its own (e.g. kombu's ack refused by a Redis at maxmemory): never exit 0 then, or a
    # restart policy keyed on failure would leave the deployment with one worker fewer.
    print(f"imgq worker: the worker stopped without being asked to (see the error above); exiting {EXIT_RETRY} "
          "so that it is restarted", file=sys.__stderr__, flush=True)  # Celery may still redirect sys.stderr
    return EXIT_RETRY


def _retrain_request(args: argparse.Namespace) -> Any:
    from model.net import ARCHITECTURES
    from worker.retrain import RetrainRequest

    if args.arch not in ARCHITECTURES:
        raise ImgqError(f"--arch {args.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return RetrainRequest(source=args.data, arch=args.arch, epochs=args.epochs,
                          init=str(args.init) if args.init else None, seed=args.seed, input_size=args.input_size)


def cmd_train(args: argparse.Namespace) -> int:
    from producer.lifecycle import train_locally

    settings = _settings(args)
    if args.out:
        settings = settings.replace(model_dir=args.out)
    outcome = train_locally(settings, _retrain_request(args))
    return 0 if outcome["event"] == "done" else 1


def cmd_retrain(args: argparse.Namespace) -> int:
    from producer.lifecycle import follow_retrain, trigger_retrain
    from worker.app import create_app

    settings = _settings(args)
    run_id = trigger_retrain(create_app(settings), settings, _retrain_request(args))
    if args.wait:
        outcome = follow_retrain(settings, run_id)
        print(run_id)
        return 0 if outcome["event"] == "done" else 1
    print(run_id)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    import tempfile

    from worker.app import app
    from worker.schedule import OncePerTickScheduler, retrain_schedule

    settings = _settings(args)
    schedule = retrain_schedule(settings)
    if not schedule:
        raise ImgqError("no retrain schedule: set IMGQ_RETRAIN_CRON (e.g. '0 3 * * *') or IMGQ_RETRAIN_INTERVAL")
    app.conf.beat_schedule = schedule
    state = args.schedule_file or str(Path(tempfile.gettempdir()) / "imgq-beat-schedule")
    app.Beat(scheduler=OncePerTickScheduler, schedule=state, loglevel=args.loglevel).run()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from producer import lifecycle

    settings = _settings(args)
    if args.action == "list":
        lifecycle.print_models(lifecycle.list_models(settings), args.json)
    elif args.action == "promote":
        if not args.version:
            raise ImgqError("imgq models promote VERSION: name the version (see `imgq models list`)")
        lifecycle.promote(settings, args.version)
        print(f"champion is now {args.version}")
    else:
        print(f"rolled back: champion is now {lifecycle.rollback(settings)}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from model.demo_data import write_imagefolder

    files = write_imagefolder(args.out_dir, split=args.split, n_per_class=args.per_class)
    print(f"wrote {len(files)} images to {args.out_dir} (ImageFolder: <class>/<image>)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    accuracy = run_demo(_settings(args), sys.stdout, per_class=args.per_class)
    return 0 if accuracy >= args.min_accuracy else 1


def _add_common(p: argparse.ArgumentParser, *, model: bool = False, fetch: bool = False) -> None:
    if model:
        p.add_argument("--model-dir", type=Path, help="model registry (IMGQ_MODEL_DIR)")
        p.add_argument("--device", choices=DEVICES, help="inference device (IMGQ_DEVICE)")
    if fetch:
        p.add_argument("--allow-network", action="append", metavar="CIDR",
                       help="allow fetching from this blocked network, e.g. 127.0.0.0/8 (IMGQ_ALLOW_NETWORKS)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="demo",
                   help="`demo`, an ImageFolder directory (root/<class>/<image>) or a url,label manifest (.csv/.jsonl)")
    p.add_argument("--arch", default="cnn", help="cnn (default), resnet18, mobilenet_v3_small, efficientnet_b0")
    p.add_argument("--epochs", type=int, help="at most this many epochs (early stopping may end sooner)")
    p.add_argument("--init", type=Path, help="start from this local safetensors weights file")
    p.add_argument("--input-size", type=int, default=64, help="training and serving image size")
    p.add_argument("--seed", type=int, default=0)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, help="results file (default: stdout)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgq", description="Batch image classification over Redis + Celery.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="classify a URL file on the embedded default (local Redis + workers)")
    p.add_argument("urls", help="URL file, one per line; - for stdin")
    _output_args(p)
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--concurrency", type=int, help="tasks in flight per worker (IMGQ_CONCURRENCY)")
    p.add_argument("--batch-size", type=int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_common(p, model=True, fetch=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a URL file to a running deployment (IMGQ_REDIS_URL)")
    p.add_argument("urls", help="URL file, one per line; - for stdin")
    p.add_argument("--batch-size", type=int, help="URLs per message (IMGQ_BATCH_SIZE)")
    p.add_argument("--wait", action="store_true", help="show progress, then write the results")
    _output_args(p)
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
    _add_common(p, fetch=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", help="export a job's results in input order")
    p.add_argument("job")
    _output_args(p)
    p.add_argument("--below", type=float, metavar="CONF",
                   help="only labelled items under this confidence, as a url,label manifest for review")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("worker", help="run one Celery worker process")
    p.add_argument("--concurrency", type=int, help="tasks in flight (IMGQ_CONCURRENCY)")
    p.add_argument("--queues", help="comma-separated queues (default: the classify queue)")
    p.add_argument("--name", help="Celery node name, e.g. gpu0@%%h")
    per_device = p.add_mutually_exclusive_group()
    per_device.add_argument("--gpus", metavar="all|0,1",
                            help="one worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES, named gpu<id>@%%h")
    per_device.add_argument("--processes", type=int, metavar="N",
                            help="N CPU worker processes, each pinned to its share of the cores, named cpu<i>@%%h")
    p.add_argument("--loglevel", default="INFO")
    _add_common(p, model=True, fetch=True)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("train", help="train here; promote the model if it passes the gate")
    _train_args(p)
    p.add_argument("--out", type=Path, help="model dir (default IMGQ_MODEL_DIR)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("retrain", help="send a retrain to the trainer worker (train queue)")
    _train_args(p)
    p.add_argument("--wait", action="store_true", help="show per-epoch progress and the outcome")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("beat", help="run Celery beat with the retrain schedule (IMGQ_RETRAIN_CRON)")
    p.add_argument("--schedule-file", help="beat's state file (default: in the temp dir)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("models", help="the model registry: list, promote VERSION, rollback")
    p.add_argument("action", choices=("list", "promote", "rollback"))
    p.add_argument("version", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model-dir", type=Path, help="model registry (IMGQ_MODEL_DIR)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo-data", help="write the built-in demo data set as an ImageFolder")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--split", choices=("train", "val", "test"), default="train")
    p.add_argument("--per-class", type=int, default=100)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="train if needed, serve held-out demo images, classify them, score")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--min-accuracy", type=float, default=0.9, help="exit 1 below this accuracy")
    _add_common(p, model=True)
    p.set_defaults(func=cmd_demo)
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: local Redis and workers are stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.func
    if handler is not cmd_worker:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handler(args)
    except ImgqError as exc:
        print(f"imgq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imgq: interrupted", file=sys.stderr)
        return 130
