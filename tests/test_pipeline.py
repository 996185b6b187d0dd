"""The plain functions under the Celery task, called directly: batch pipeline, idempotent writes, batcher."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from imgq.jobs import JobStore
from imgq.redis_server import RedisServer
from imgq.throughput import written_last
from model.classifier import Classifier, Prediction
from model.registry import load_champion
from tests.support import ImageSite, settings_for
from worker.batcher import Batcher
from worker.pipeline import classify_batch
from worker.serving import Serving


@pytest.fixture(scope="module")
def engine(redis_server: RedisServer, model_dir: Path) -> Iterator[Serving]:
    e = Serving(settings_for(redis_server.url, model_dir, IMGQ_MAX_DELIVERIES="2"))
    yield e
    e.close()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_server.url, ttl_s=60)
    yield s
    s.r.close()


def _items(site: ImageSite, n: int) -> list[tuple[int, str]]:
    return list(enumerate([*list(site.truth)[: n - 1], site.url("bad/page.jpg")]))


def test_a_batch_writes_one_record_per_item_and_redelivery_writes_nothing(
        engine: Serving, store: JobStore, image_site: ImageSite) -> None:
    job = store.create_job()
    items = _items(image_site, 8)
    store.add_batches(job, items=len(items), batches=1)
    store.finish_submission(job)

    written_before = written_last(store.r)
    assert classify_batch(engine, store, job, 0, items) == 8
    first = [r for r in store.iter_results(job, 8)]
    # Delivered again (a worker died after writing, before acking): no new writes, no double count.
    assert classify_batch(engine, store, job, 0, items) == 0
    assert written_last(store.r) == written_before + 8  # the throughput `imgq status` shows, counted once
    status = store.status(job)
    assert (status.done, status.failed, status.state) == (8, 1, "done")
    assert [r for r in store.iter_results(job, 8)] == first
    assert first[-1]["error"]["code"] == "not_an_image"  # type: ignore[index]
    assert all(r["label"] == image_site.truth[r["url"]] for r in first[:-1])  # type: ignore[index]


def test_a_batch_delivered_too_often_ends_as_worker_lost(engine: Serving, store: JobStore,
                                                         image_site: ImageSite) -> None:
    job = store.create_job()
    items = _items(image_site, 4)
    store.add_batches(job, items=4, batches=1)
    store.finish_submission(job)
    for _ in range(2):  # two deliveries that died before writing anything
        store.count_delivery(job, 7)
    assert classify_batch(engine, store, job, 7, items) == 4  # third delivery > IMGQ_MAX_DELIVERIES=2
    records = list(store.iter_results(job, 4))
    assert {r["error"]["code"] for r in records} == {"worker_lost"}  # type: ignore[index]
    assert store.status(job).state == "done" and store.status(job).dead_batches == 1
    assert store.dead_batches(job) == [{"batch": 7, "deliveries": 2, "indices": [0, 1, 2, 3]}]


def test_the_batcher_merges_concurrent_requests_and_never_mixes_models(model_dir: Path) -> None:
    a, b = load_champion(model_dir), load_champion(model_dir)  # two model objects, as during a reload
    batcher = Batcher(max_batch=64, max_wait_s=0.05)
    seen: list[tuple[int, int]] = []
    for model in (a, b):
        original = model.predict

        def spy(batch: torch.Tensor, k: int = 3, _orig: Callable[..., list[Prediction]] = original,
                _m: Classifier = model) -> list[Prediction]:
            seen.append((id(_m), len(batch)))
            return _orig(batch, k=k)

        model.predict = spy  # type: ignore[method-assign]
    x = torch.zeros(3, 3, a.preprocess.size, a.preprocess.size)
    out: dict[int, list[Prediction]] = {}

    def ask(i: int) -> None:
        out[i] = batcher.predict(a if i % 2 else b, list(x), 2)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert all(len(v) == 3 and all(len(p) == 2 for p in v) for v in out.values())
    assert len(seen) < 8  # requests were merged into fewer forward passes
    # Each model saw exactly its own 4 requests x 3 rows: no forward pass mixed the two.
    assert {m: sum(n for mm, n in seen if mm == m) for m, _ in seen} == {id(a): 12, id(b): 12}
