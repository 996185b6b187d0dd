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
    from producer.urls import read_urls

    settings = _settings(args)
    out = open_output(args.output)
    try:
        report = run_job(read_urls(args.urls), out, settings=settings, workers=args.workers,
                         concurrency=args.concurrency, fmt=args.format, progress=not args.quiet)
    finally:
        if out is not sys.stdout:
            out.close()
    print(report.describe(), file=sys.stderr)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.submit import submit_urls
    from producer.urls import read_urls
    from worker.app import create_app

    settings = _settings(args)
    store = _store(settings)
    app = create_app(settings)
    job_id = submit_urls(read_urls(args.urls), settings=settings, store=store, app=app)
    if args.wait:
        from producer.export import export_results
        from producer.run import open_output
        from producer.wait import wait_for_job

        wait_for_job(store, job_id, progress=True)
        out = open_output(args.output)
        try:
            export_results(store, job_id, out, args.format)
        finally:
            if out is not sys.stdout:
                out.close()
    print(job_id)  # last line of stdout: scripts capture it
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _store(_settings(args)).status(args.job)
    if args.json:
        print(json.dumps(status.to_dict()))
    else:
        for key, value in status.to_dict().items():
            print(f"{key:>12}: {value}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from producer.export import export_results
    from producer.run import open_output

    out = open_output(args.output)
    try:
        summary = export_results(_store(_settings(args)), args.job, out, args.format)
    finally:
        if out is not sys.stdout:
            out.close()
    if summary.missing:
        print(f"imgq: {summary.missing} items have no result yet (job still running?)", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # The worker process reads its settings from the environment (worker.app), once: hand the
    # CLI's overrides over that way.
    os.environ.update(settings.to_env())
    from model.registry import champion_version

    queues = args.queues or settings.classify_queue
    if settings.classify_queue in queues.split(",") and champion_version(settings.model_dir) is None:
        raise ImgqError(f"no model in {settings.model_dir} ({settings.env_name('model_dir')}); "
                        "train one first: imgq train --data demo")
    from worker.app import app

    argv = ["worker", f"--loglevel={args.loglevel}", "-Q", queues, "-c", str(settings.concurrency)]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, train

    settings = _settings(args)
    model_dir = args.out or settings.model_dir
    config = TrainConfig(source=args.data, arch=args.arch, seed=args.seed,
                         **({"epochs": args.epochs} if args.epochs else {}))
    result = train(config, model_dir, on_epoch=lambda e: print(
        f"epoch {e.epoch}: train loss {e.train_loss:.4f} acc {e.train_accuracy:.3f} | "
        f"val loss {e.val_loss:.4f} acc {e.val_accuracy:.3f} | {e.seconds:.1f} s", flush=True))
    print(f"model {result.version} written to {model_dir}: val accuracy {result.val_accuracy:.4f}")
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

    p = sub.add_parser("status", help="a job's progress")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("results", help="export a job's results in input order")
    p.add_argument("job")
    _output_args(p)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("worker", help="run one Celery worker process")
    p.add_argument("--concurrency", type=int, help="tasks in flight (IMGQ_CONCURRENCY)")
    p.add_argument("--queues", help="comma-separated queues (default: the classify queue)")
    p.add_argument("--name", help="Celery node name, e.g. gpu0@%%h")
    p.add_argument("--loglevel", default="INFO")
    _add_common(p, model=True, fetch=True)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("train", help="train a model and make it the champion")
    p.add_argument("--data", default="demo", help="`demo` or an ImageFolder directory (root/<class>/<image>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="model dir (default IMGQ_MODEL_DIR)")
    p.set_defaults(func=cmd_train)

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
