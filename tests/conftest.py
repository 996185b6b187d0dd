"""Shared fixtures: a real redis-server, a trained model, a real image server and real worker processes.

Nothing is faked: workers are `imgq worker` subprocesses (the command a deployment runs), images come
over HTTP from 127.0.0.1, and Redis is a real server on a free port.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from imgq.redis_server import RedisServer
from model.demo_data import write_imagefolder
from model.train import TrainConfig, train
from producer.demo import serve_directory
from tests.support import Cluster, ImageSite, settings_for

# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so would every
# `imgq` subprocess it starts: the Ctrl-C tests would then test nothing. Give SIGINT its Python handler
# (children get the default action back at exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default CNN, trained once per session (per pytest-xdist process) on the demo set (about 20 s)."""
    out = tmp_path_factory.mktemp("models")
    # Local iteration only: IMGQ_TEST_MODEL_CACHE=/some/dir reuses one trained model across runs. CI trains.
    cache = os.environ.get("IMGQ_TEST_MODEL_CACHE")
    if cache and (Path(cache) / "CHAMPION").is_file():
        shutil.copytree(cache, out, dirs_exist_ok=True)
        return out
    # The demo's own recipe, what `make demo` trains: the label tests need every held-out image right (seed 0:
    # 0 of 60 wrong; 6 epochs left 2 wrong).
    result = train(TrainConfig(source="demo"), out)
    assert result.val_accuracy > 0.9, result
    if cache:
        shutil.copytree(out, cache, dirs_exist_ok=True)
    return out


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


@pytest.fixture
def make_cluster(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Clusters on a Redis of their own, with extra IMGQ_* settings for producer and workers alike."""
    made: list[tuple[Cluster, RedisServer]] = []

    def make(redis_server: RedisServer | None = None, **env: str) -> Cluster:
        server = redis_server or RedisServer().start()
        cluster = Cluster(settings_for(server.url, model_dir, **env), tmp_path)
        made.append((cluster, server))
        return cluster

    yield make
    for cluster, server in made:
        cluster.stop()
        server.stop()


@pytest.fixture
def lifecycle(model_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    """A private Redis and a private copy of the registry: for tests that change the champion.

    Generous fetch budgets: those tests train or add models on the cores the worker uses."""
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    with RedisServer() as server:
        c = Cluster(settings_for(server.url, models, IMGQ_RELOAD_CHECK="0.2", IMGQ_FETCH_TIMEOUT="30",
                                 IMGQ_VISIBILITY_TIMEOUT="60", IMGQ_TASK_TIME_LIMIT="50"), tmp_path)
        yield c
        c.stop()
