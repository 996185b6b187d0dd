"""What the tests share besides fixtures: the test settings, the cluster helper built on the product's own
:class:`imgq.local.LocalCluster`, and small helpers. Fixtures live in conftest.py and use these.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from aiohttp import web

from imgq import keys
from imgq.jobs import JobStatus, JobStore
from imgq.local import LocalCluster
from imgq.redis_server import free_port
from imgq.settings import Settings
from producer.reconcile import stall_repair
from producer.submit import submit_urls
from producer.wait import wait_for_job
from tests.httpserver import HTTPTestServer

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
    # A test that does open a metrics port keeps it on loopback (the default is every interface).
    "IMGQ_METRICS_ADDR": "127.0.0.1",
}


@dataclass
class ImageSite:
    base: str
    root: Path
    truth: dict[str, str]  # URL -> class of every demo image served

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


def settings_for(redis_url: str, model_dir: Path, **env: str) -> Settings:
    return Settings.from_env({**TEST_ENV, "IMGQ_REDIS_URL": redis_url, "IMGQ_MODEL_DIR": str(model_dir), **env})


class Cluster(LocalCluster):
    """Worker subprocesses on a Redis the test owns, with the producer calls tests make: submit and wait."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        super().__init__(settings, workers=0, redis=False, log_dir=log_dir)
        self.store = JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)

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
        super().stop()
        self.store.r.close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/nothing-listens-here.jpg"


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def one_image_site(image_site: ImageSite, *, slow_s: float, slow_path: str = "/slow.png",
                   content_type: str = "image/png") -> Iterator[tuple[HTTPTestServer, str]]:
    """One demo image under /img.png (at once) and ``slow_path`` (after ``slow_s``), with its class; query
    strings make URLs distinct, and every good URL should be labelled with that class."""
    url, label = next(iter(image_site.truth.items()))
    body = (image_site.root / url.removeprefix(image_site.base + "/")).read_bytes()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(slow_s)
        return web.Response(body=body, content_type=content_type)

    with HTTPTestServer() as server:
        server.add("/img.png", body=body, content_type=content_type)
        server.add_handler(slow_path, slow)
        yield server, label


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str | Callable[[], str],
               poll_s: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout_s`` (a bound, not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what if isinstance(what, str) else what()}"
        time.sleep(poll_s)


def every_index_once(cluster: Cluster, job: str, n: int) -> list[dict[str, object]]:
    """The job is done with exactly one result for each of its ``n`` indices; returns them in order."""
    status = cluster.store.status(job)
    assert (status.total, status.done, status.state) == (n, n, "done"), status
    assert cluster.store.r.hlen(keys.results(job)) == n
    results = cluster.results(job)
    assert [r["index"] for r in results] == list(range(n))
    return results


def copy_of_champion(models: Path) -> tuple[str, Path]:
    """The champion's version id, and a copy of its version directory under a new id (its meta.json says so)
    for a test to damage."""
    from model.pointer import champion_version
    from model.registry import version_dir

    good = champion_version(models)
    assert good is not None
    bad = good[:-8] + "0badf00d"
    shutil.copytree(version_dir(models, good), version_dir(models, bad))
    meta = json.loads((version_dir(models, bad) / "meta.json").read_text())
    meta["version"] = bad
    (version_dir(models, bad) / "meta.json").write_text(json.dumps(meta))
    return good, version_dir(models, bad)
