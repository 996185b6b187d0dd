"""The `imgq` command line (also `python -m cli`): one parser, each role's commands in its own module.

    cli/jobs.py     run, submit, status, reconcile, report, results (producer side; no torch)
    cli/serve.py    worker, beat (the deployment's long-running roles)
    cli/models.py   train, retrain, models, demo-data, demo (the model lifecycle)

Handlers are thin: parse, call, print. An :class:`ImgqError` ends a command with one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cli import jobs, models, serve
from imgq.errors import ImgqError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgq", description="Batch image classification over Redis + Celery.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for role in (jobs, serve, models):
        role.register(sub)
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: local Redis and workers are stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.func
    if handler is not serve.cmd_worker:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handler(args)
    except ImgqError as exc:
        print(f"imgq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imgq: interrupted", file=sys.stderr)
        return 130
