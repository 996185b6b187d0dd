"""`imgq worker|beat`: the long-running roles of a deployment."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from cli.options import add_common, settings_from
from imgq.errors import ImgqError
from imgq.settings import Settings


def unused_queues(settings: Settings, queues: str) -> str | None:
    """A one-line warning when ``--queues`` names a queue imgq never sends to (a typo, or the short name of one),
    else None."""
    known = (settings.classify_queue, settings.train_queue)
    unknown = [q for q in (part.strip() for part in queues.split(",")) if q and q not in known]
    if not unknown:
        return None
    return (f"imgq worker: warning: nobody sends to queue {', '.join(unknown)}: imgq sends classify batches to "
            f"{settings.classify_queue} (IMGQ_CLASSIFY_QUEUE) and retrains to {settings.train_queue} "
            f"(IMGQ_TRAIN_QUEUE); starting anyway")


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.queues and (warning := unused_queues(settings, args.queues)):
        print(warning, file=sys.stderr, flush=True)
    if args.gpus or args.processes is not None:
        from worker.supervisor import run_workers  # never imports torch: CUDA stays untouched here

        if args.name:
            raise ImgqError("--name names one worker; with --gpus/--processes they are gpu<id>@%h / cpu<i>@%h")
        return run_workers(settings, gpus=args.gpus, processes=args.processes, queues=args.queues,
                           loglevel=args.loglevel)
    # The worker process reads its settings from the environment (worker.app), once: hand the
    # CLI's overrides over that way.
    os.environ.update(settings.to_env())
    from model.pointer import require_champion

    queues = args.queues or settings.classify_queue
    if settings.classify_queue in queues.split(","):
        require_champion(settings.model_dir, settings.env_name("model_dir"))
    from worker.app import EXIT_RETRY, app, stop_was_requested

    # Without mingle and gossip: mingle waits a second at start for other workers' revoked-task lists and
    # gossip follows other workers' events; imgq revokes nothing and needs neither (Flower reads events).
    argv = ["worker", f"--loglevel={args.loglevel}", "-Q", queues, "-c", str(settings.concurrency),
            "--without-mingle", "--without-gossip"]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)  # returns when the worker stops; Celery's exit code is not handed back
    if stop_was_requested():
        _exit_now(0)
    # Stopped on its own (e.g. kombu's ack refused by a Redis at maxmemory): never exit 0 then, or a
    # restart policy keyed on failure would leave the deployment with one worker fewer.
    print(f"imgq worker: the worker stopped without being asked to (see the error above); exiting {EXIT_RETRY} "
          "so that it is restarted", file=sys.__stderr__, flush=True)  # Celery may still redirect sys.stderr
    _exit_now(EXIT_RETRY)


def _exit_now(code: int) -> NoReturn:
    """End the worker process once Celery has shut down (its shutdown signals have run: batches acked or
    requeued, serving closed). The interpreter's own teardown of torch's modules and threads adds seconds to
    every stop and restart, and has nothing left to save."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)


def cmd_beat(args: argparse.Namespace) -> int:
    import tempfile

    from worker.app import app
    from worker.schedule import OncePerTickScheduler, retrain_schedule

    settings = settings_from(args)
    schedule = retrain_schedule(settings)
    if not schedule:
        raise ImgqError("no retrain schedule: set IMGQ_RETRAIN_CRON (e.g. '0 3 * * *') or IMGQ_RETRAIN_INTERVAL")
    app.conf.beat_schedule = schedule
    state = args.schedule_file or str(Path(tempfile.gettempdir()) / "imgq-beat-schedule")
    app.Beat(scheduler=OncePerTickScheduler, schedule=state, loglevel=args.loglevel).run()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    add_common(p, model=True, fetch=True)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="run Celery beat with the retrain schedule (IMGQ_RETRAIN_CRON)")
    p.add_argument("--schedule-file", help="beat's state file (default: in the temp dir)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_beat)

