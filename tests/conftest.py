"""Shared fixtures: a real redis-server, a trained model, a real image server and real worker processes.

Nothing is faked: workers are `imgq worker` subprocesses (the command a deployment runs), images come
over HTTP from 127.0.0.1, and Redis is a real server on a free port.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest
from celery import Celery
from PIL import Image

from imgq.jobs import JobStatus, JobStore
from imgq.redis_server import RedisServer, free_port
from imgq.settings import Settings
from model.demo_data import write_imagefolder
from model.train import TrainConfig, train
from producer.demo import serve_directory
from producer.local import WorkerProcess
from producer.reconcile import stall_repair
from producer.submit import submit_urls
from producer.wait import wait_for_job
from worker.app import create_app

# Short delivery timings so redelivery after a killed worker happens within seconds in tests.
TEST_ENV = {
    "IMGQ_ALLOW_NETWORKS": "127.0.0.0/8",
    "IMGQ_FETCH_TIMEOUT": "3",
    "IMGQ_CONNECT_TIMEOUT": "1",
    "IMGQ_VISIBILITY_TIMEOUT": "6",
    "IMGQ_TASK_TIME_LIMIT": "5",
    "IMGQ_DECODE_TIMEOUT": "2",
    "IMGQ_LEASE": "3",
    "IMGQ_SWEEP_INTERVAL": "2",
    "IMGQ_CONCURRENCY": "4",
    "IMGQ_TORCH_THREADS": "1",
    "IMGQ_BATCH_SIZE": "16",
    # No fixed metrics port: parallel workers (and CI runs) would race for it. Tests that scrape pick one.
    "IMGQ_METRICS_PORT": "0",
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default CNN, trained once per session on the demo set."""
    out = tmp_path_factory.mktemp("models")
    # Local iteration only: IMGQ_TEST_MODEL_CACHE=/some/dir reuses one trained model across runs. CI trains.
    cache = os.environ.get("IMGQ_TEST_MODEL_CACHE")
    if cache and (Path(cache) / "CHAMPION").is_file():
        shutil.copytree(cache, out, dirs_exist_ok=True)
        return out
    result = train(TrainConfig(source="demo", epochs=6), out)
    assert result.val_accuracy > 0.9, result
    if cache:
        shutil.copytree(out, cache, dirs_exist_ok=True)
    return out


@dataclass
class ImageSite:
    base: str
    root: Path
    truth: dict[str, str]  # URL -> class of every demo image served

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture(scope="session")
def image_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageSite]:
    """Held-out demo images plus a few bad files, over real HTTP on loopback."""
    root = tmp_path_factory.mktemp("site")
    files = write_imagefolder(root, split="test", n_per_class=10)
    (root / "bad").mkdir()
    (root / "bad" / "page.jpg").write_text("<html><body>not an image</body></html>")
    good = io.BytesIO()
    Image.new("RGB", (200, 200), (200, 30, 30)).save(good, "JPEG")
    (root / "bad" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with serve_directory(root) as base:
        truth = {f"{base}/{p.relative_to(root).as_posix()}": label for p, label in files}
        yield ImageSite(base, root, truth)


def settings_for(redis_url: str, model_dir: Path, **env: str) -> Settings:
    return Settings.from_env({**TEST_ENV, "IMGQ_REDIS_URL": redis_url, "IMGQ_MODEL_DIR": str(model_dir), **env})


class Cluster:
    """A Redis server plus worker subprocesses, with helpers to submit and wait."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.app: Celery = create_app(settings)
        self.store = JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)
        self.workers: list[WorkerProcess] = []

    def start_worker(self, name: str | None = None, queues: str | None = None, **env: str) -> WorkerProcess:
        worker = WorkerProcess(self.settings, name=name or f"w{len(self.workers)}@%h", log_dir=self.log_dir,
                               extra_env=env, queues=queues)
        self.workers.append(worker)
        return worker

    def wait_ready(self, n: int = 1, timeout_s: float = 90.0) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while len(self.app.control.ping(timeout=0.5)) < n:
            for w in self.workers:
                w.check_alive()
            assert time.monotonic() < deadline, "workers not ready:\n" + "\n".join(w.log_tail() for w in self.workers)

    def submit(self, urls: list[str]) -> str:
        return submit_urls(urls, settings=self.settings, store=self.store, app=self.app)

    def wait(self, job_id: str, timeout_s: float = 120.0, *, urls: list[str] | None = None,
             stream: TextIO = sys.stderr) -> JobStatus:
        """Wait as `imgq submit --wait` does; given the ``urls`` it also re-enqueues a stalled job's missing items."""
        def alive() -> None:
            if not any(w.proc.poll() is None for w in self.workers):
                raise AssertionError("no live worker:\n" + "\n".join(w.log_tail() for w in self.workers))

        repair = None if urls is None else stall_repair(job_id, lambda: urls, settings=self.settings,
                                                        store=self.store, app=self.app)
        return wait_for_job(self.store, job_id, progress=False, timeout_s=timeout_s, alive=alive, repair=repair,
                            stream=stream)

    def results(self, job_id: str) -> list[dict[str, object]]:
        total = self.store.status(job_id).total
        return [r for r in self.store.iter_results(job_id, total) if r is not None]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.store.r.close()
        self.app.close()


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    """One shared worker on the session Redis, for tests that don't kill anything."""
    c = Cluster(settings_for(redis_server.url, model_dir), tmp_path_factory.mktemp("logs"))
    c.start_worker()
    c.wait_ready()
    yield c
    c.stop()


@pytest.fixture
def private_cluster(model_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    """A Redis of its own and no worker yet: for tests that kill or restart things."""
    with RedisServer() as server:
        c = Cluster(settings_for(server.url, model_dir), tmp_path)
        yield c
        c.stop()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/nothing-listens-here.jpg"


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
