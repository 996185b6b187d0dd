"""The `imgq` command line (also `python -m cli`): one parser, each role's commands in its own module.

    cli/jobs.py     run, submit, status, reconcile, report, results (producer side; no torch)
    cli/serve.py    worker, beat (the deployment's long-running roles)
    cli/models.py   train, retrain, models, demo-data, demo (the model lifecycle)

Handlers are thin: parse, call, print. Every failure ends here as ONE line on stderr, ``imgq: <what
failed>; <what to do>``, and an exit code of :class:`imgq.errors.ExitCode` (README, "Exit codes"), never a
traceback: an :class:`ImgqError` says it itself; Redis, the broker and files that fail are named here (the
Redis URL without its password); a bug is one line too, with the traceback under ``-v``. Usage errors are
argparse's (exit 2); a closed stdout (``| head``) ends silently with 141, as a tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, NoReturn

import redis
from kombu.exceptions import OperationalError

from cli import jobs, models, serve
from imgq.errors import ExitCode, ImgqError
from imgq.settings import Settings, redacted_url


def _version() -> str:
    try:
        return metadata.version("imgq")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too (and the usage is a `-h` away), still exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message}; see `{self.prog} -h`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgq", description="Batch image classification over Redis + Celery.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, and the traceback of a bug")
    parser.add_argument("--version", action="version", version=f"imgq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for role in (jobs, serve, models):
        role.register(sub)
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: local Redis and workers are stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False) and not args.verbose:
        logging.getLogger().setLevel(logging.ERROR)  # -q: no notes (e.g. "waiting for workers"); errors still
    handler: Callable[[argparse.Namespace], int] = args.func
    if handler is not serve.cmd_worker:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = handler(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the net, not at interpreter exit
        return code
    except BrokenPipeError:
        # `imgq results JOB | head`: the reader has what it wanted. Point stdout at /dev/null so that the
        # interpreter's last flush does not raise again, and end as `cat` would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.PIPE_CLOSED
    except KeyboardInterrupt:
        print("imgq: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # each kind becomes one line; a bug keeps its traceback under -v
        line, exit_code = describe_failure(exc)
        if args.verbose and exit_code is None:
            traceback.print_exc()
        print(_scrub(f"imgq: {line}"), file=sys.stderr)
        return ExitCode.FAILED if exit_code is None else exit_code


def describe_failure(exc: Exception) -> tuple[str, ExitCode | None]:
    """The one line for ``exc`` (without the ``imgq: `` prefix), and its exit code; None: a bug."""
    if isinstance(exc, ImgqError):
        return str(exc), exc.exit_code
    url = _redis_url()
    timeout = _redis_timeout()
    if isinstance(exc, OperationalError):  # kombu's wrapper: what Redis said is the cause
        exc = next((e for e in (exc.__cause__, exc.__context__) if isinstance(e, redis.RedisError)), exc)
    if isinstance(exc, redis.AuthenticationError):
        if "@" not in url:
            return (f"Redis at {url} asks for a password and IMGQ_REDIS_URL gives none; put it there, e.g. "
                    "redis://:PASSWORD@host:6379/0", ExitCode.FAILED)
        return (f"Redis at {url} refused the credentials in IMGQ_REDIS_URL ({exc}); fix the password (and user) "
                "there", ExitCode.FAILED)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OperationalError):
        return (f"cannot reach Redis at {url} within IMGQ_REDIS_TIMEOUT={timeout} s ({exc}); start Redis there "
                "or point IMGQ_REDIS_URL at a running one", ExitCode.FAILED)
    if isinstance(exc, redis.ResponseError):
        return (f"Redis at {url} refused a command ({exc}); see that Redis server's log (memory, persistence, "
                "a replica that is read-only)", ExitCode.FAILED)
    if isinstance(exc, redis.RedisError):
        return (f"Redis at {url} did not answer as Redis does ({type(exc).__name__}: {exc}); check that "
                "IMGQ_REDIS_URL names a Redis server", ExitCode.FAILED)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}; check the path and its permissions", ExitCode.FAILED
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}", ExitCode.FAILED
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"unexpected error: {type(exc).__name__}: {first}; this is a bug in imgq: rerun with -v for the "
            "traceback and report it", None)


def _settings() -> Settings | None:
    try:
        return Settings.from_env()
    except ImgqError:
        return None


def _redis_url() -> str:
    settings = _settings()
    return "IMGQ_REDIS_URL" if settings is None else redacted_url(settings.redis_url)


def _redis_timeout() -> str:
    settings = _settings()
    return "?" if settings is None else f"{settings.redis_timeout_s:g}"


def _scrub(line: str) -> str:
    """Never print IMGQ_REDIS_URL's password, whatever an exception's text carried."""
    settings = _settings()
    if settings is not None:
        from urllib.parse import urlsplit

        password = urlsplit(settings.redis_url).password
        if password:
            line = line.replace(password, "***")
    return line
