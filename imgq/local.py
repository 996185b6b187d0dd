"""The embedded default: a private Redis and local worker processes, started and stopped for one run.

`imgq run` sends its job through the same producer -> Redis -> Celery path as a cluster would; only the
processes are ours to start and stop (also on Ctrl-C).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from imgq.celery_app import create_app
from imgq.errors import ExitCode, ImgqError
from imgq.redis_server import RedisServer
from imgq.settings import Settings


def worker_command(*, concurrency: int | None = None, name: str | None = None,
                   queues: str | None = None) -> list[str]:
    """The command a local worker process runs: the same `imgq worker` a deployment runs."""
    cmd = [sys.executable, "-m", "cli", "worker"]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    if name:
        cmd += ["--name", name]
    if queues:
        cmd += ["--queues", queues]
    return cmd


class WorkerProcess:
    """One `imgq worker` subprocess with its log in a file."""

    def __init__(self, settings: Settings, *, name: str, concurrency: int | None = None,
                 log_dir: Path, extra_env: dict[str, str] | None = None, queues: str | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(worker_command(concurrency=concurrency, name=name, queues=queues), env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code == ExitCode.REFUSED:  # it said why in one line: that line is the whole story
            said = [line for line in self.log_tail(200).splitlines() if line.startswith("imgq worker: ")]
            if said:
                raise ImgqError(f"worker {self.name} refused to start: {said[-1].removeprefix('imgq worker: ')}")
        if code is not None:
            raise ImgqError(f"worker {self.name} exited with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        self.terminate()
        self.wait_stopped(timeout_s)

    def terminate(self) -> None:
        """Ask for Celery's warm shutdown (unfinished batches go back to the queue); returns at once."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def wait_stopped(self, timeout_s: float = 15.0) -> None:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LocalCluster:
    """A Redis and `imgq worker` processes, started and stopped together: the embedded default (`imgq run`)
    and the tests' cluster (tests/support.py builds on this class).

    By default it starts a private redis-server; ``redis=False`` uses the Redis that ``settings`` names and
    owns only its workers. ``workers`` are started by :meth:`start`; :meth:`start_worker` adds more.
    """

    def __init__(self, settings: Settings, *, workers: int = 1, concurrency: int | None = None,
                 redis: bool = True, log_dir: Path | None = None, wait_ready: bool = True,
                 kill_on_stop: bool = False) -> None:
        """``wait_ready=False``: :meth:`start` returns once the processes are started, so the caller's own work
        (submitting a job) overlaps the workers' start-up; :meth:`check_alive` still reports a worker that
        refused to start. ``kill_on_stop``: stop workers with SIGKILL, for a cluster whose Redis is private
        and discarded with it, where nothing a worker holds outlives the stop (`imgq run` once its results are
        written out); a warm shutdown there only costs seconds."""
        self.n_workers = workers
        self.wait_for_ready = wait_ready
        self.kill_on_stop = kill_on_stop
        self.concurrency = concurrency
        self.redis: RedisServer | None = RedisServer() if redis else None
        if settings.metrics_addr == Settings.metrics_addr and "IMGQ_METRICS_ADDR" not in os.environ:
            # These workers are this machine's alone (`imgq run`, the benchmarks): their /metrics stays on
            # loopback unless an address is asked for. A deployed `imgq worker` listens on all interfaces.
            settings = settings.replace(metrics_addr="127.0.0.1")
        self.settings = settings if self.redis is None else settings.replace(redis_url=self.redis.url)
        self._tmp = tempfile.TemporaryDirectory(prefix="imgq-run-") if log_dir is None else None
        self.log_dir = Path(self._tmp.name) if self._tmp is not None else log_dir
        self.workers: list[WorkerProcess] = []
        self.app: Celery = create_app(self.settings)

    def start(self, ready_timeout_s: float = 120.0) -> LocalCluster:
        if self.redis is not None:
            self.redis.start()
        for i in range(self.n_workers):
            self._spawn(f"local{i}@%h", None, self.concurrency, {})
        if self.wait_for_ready:
            self.wait_ready(timeout_s=ready_timeout_s)
        return self

    def start_worker(self, name: str | None = None, queues: str | None = None, **env: str) -> WorkerProcess:
        """One more `imgq worker`; ``env`` holds extra IMGQ_* settings for it alone."""
        return self._spawn(name or f"w{len(self.workers)}@%h", queues, None, env)

    def _spawn(self, name: str, queues: str | None, concurrency: int | None, env: dict[str, str]) -> WorkerProcess:
        assert self.log_dir is not None
        worker = WorkerProcess(self.settings, name=name, concurrency=concurrency, log_dir=self.log_dir,
                               extra_env=env, queues=queues)
        self.workers.append(worker)
        return worker

    def wait_ready(self, n: int | None = None, timeout_s: float = 120.0) -> None:
        """Until ``n`` workers (default: every one started) answer a Celery ping; raises if one exited."""
        want = len(self.workers) if n is None else n
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                # limit: return as soon as that many answered, not after the whole timeout
                if len(self.app.control.ping(timeout=0.5, limit=want)) >= want:
                    return
            except (redis.ConnectionError, OperationalError, OSError):
                pass  # a broker connection dropped while we asked (seen on a loaded machine): ask again
            if time.monotonic() > deadline:
                tails = "\n".join(w.log_tail() for w in self.workers)
                raise ImgqError(f"workers not ready after {timeout_s:g} s:\n{tails}")

    def check_alive(self) -> None:
        for w in self.workers:
            w.check_alive()

    def stop_workers(self) -> None:
        """Stop every worker (SIGKILL with ``kill_on_stop``, else a warm shutdown) and wait for them."""
        # All at once: each worker's shutdown takes a while, and they need not take turns.
        for w in self.workers:
            if self.kill_on_stop:
                w.kill()
            else:
                w.terminate()
        for w in self.workers:
            w.wait_stopped()
        self.workers.clear()

    def stop(self) -> None:
        self.stop_workers()
        self.app.close()
        if self.redis is not None:
            self.redis.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
