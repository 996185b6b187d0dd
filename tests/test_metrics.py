"""A real `imgq worker` process's Prometheus endpoint, scraped while and after a job runs; the Redis-backed
queue metrics on a real backlog and a Redis that never answers; reload failures and retrain outcomes."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cli.lifecycle import trigger_retrain
from imgq.errors import SettingsError
from imgq.jobs import JobStore
from imgq.local import LocalCluster
from imgq.redis_server import RedisServer, free_port
from imgq.settings import Settings
from model.champion import Champion
from model.checkpoint import WEIGHTS_FILE
from model.classifier import Classifier
from model.pointer import champion_version
from model.retrain import RetrainRequest
from tests.support import Cluster, ImageSite, closed_port_url, copy_of_champion, wait_until
from worker import metrics
from worker.model_watch import ModelWatcher

# Tests listen on loopback only (the product's default is all interfaces).
LOOPBACK = {"IMGQ_METRICS_ADDR": "127.0.0.1"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_match_the_job(private_cluster: Cluster, image_site: ImageSite, model_dir: Path) -> None:
    port = free_port()
    worker = private_cluster.start_worker("metered@%h", IMGQ_METRICS_PORT=str(port), **LOOPBACK)
    private_cluster.wait_ready()
    good = list(image_site.truth)[:40]
    bad = [image_site.url("no/such.jpg"), image_site.url("bad/page.jpg"), image_site.url("bad/truncated.jpg"),
           image_site.url("gone.png"), closed_port_url(), "ftp://example.com/x.jpg"]
    urls = good[:20] + bad + good[20:]  # 46 URLs: 3 batches of at most 16 (TEST_ENV)
    job = private_cluster.submit(urls)

    # While it runs: counters only grow, and never past the job.
    seen: list[float] = []
    while private_cluster.store.status(job).state != "done":
        seen.append(value(scrape(port), "imgq_images_total", outcome="labelled"))
        private_cluster.workers[0].check_alive()
        time.sleep(0.05)
    assert seen == sorted(seen) and all(n <= len(good) for n in seen)

    status = private_cluster.store.status(job)
    results = private_cluster.results(job)
    codes = Counter(r["error"]["code"] for r in results if r["error"])  # type: ignore[index]
    assert sum(codes.values()) == status.failed == len(bad)
    m = scrape(port)
    assert value(m, "imgq_images_total", outcome="labelled") == status.done - status.failed == len(good)
    assert value(m, "imgq_images_total", outcome="error") == len(bad)
    assert {code: value(m, "imgq_item_errors_total", code=code) for code in codes} == codes
    # Every labelled image went through exactly one forward pass row; failed ones never reached the model.
    assert value(m, "imgq_forward_batch_size_sum") == len(good)
    assert 1 <= value(m, "imgq_forward_batch_size_count") <= 3
    for stage in ("fetch", "decode", "infer", "write"):
        assert value(m, "imgq_stage_seconds_count", stage=stage) == 3, stage
        assert value(m, "imgq_stage_seconds_sum", stage=stage) > 0, stage
    assert value(m, "imgq_queue_wait_seconds_count", task="imgq.classify") == 3
    assert value(m, "imgq_queue_wait_seconds_sum", task="imgq.classify") > 0
    version = champion_version(model_dir)
    assert value(m, "imgq_model_info", device="cpu", version=str(version)) == 1
    (worker_labels,) = [dict(labels) for name, labels in m if name == "imgq_worker_info"]
    assert worker_labels["node"] == f"metered@{socket.gethostname()}"
    # The operator's metrics: every item's enqueue-to-result latency, nothing in flight, the queue drained.
    assert value(m, "imgq_item_latency_seconds_count") == len(urls)
    assert value(m, "imgq_item_latency_seconds_sum") > 0
    assert value(m, "imgq_batches_in_flight") == 0
    assert value(m, "imgq_worker_ready") == 1
    assert value(m, "imgq_redis_up") == 1
    assert value(m, "imgq_queue_depth", queue="imgq.classify") == 0
    assert value(m, "imgq_queue_oldest_age_seconds", queue="imgq.classify") == 0
    assert value(m, "imgq_champion_info", version=str(version)) == 1
    assert value(m, "imgq_model_load_failures_total") == 0
    assert f"metrics on http://127.0.0.1:{port}/metrics" in worker.log_tail(400)


def test_queue_metrics_read_the_backlog_from_redis(private_cluster: Cluster, image_site: ImageSite) -> None:
    """No worker consumes: the submitted batches wait in Redis, and a scrape sees them and their age."""
    submitted_after = time.time()
    private_cluster.submit(list(image_site.truth)[:40])  # 3 batches of at most 16 (TEST_ENV)
    settings = private_cluster.settings
    collector = metrics.RedisCollector(private_cluster.store.r, [settings.classify_queue, settings.train_queue])
    m = samples_of(collector)
    age = value(m, "imgq_queue_oldest_age_seconds", queue=settings.classify_queue)
    assert value(m, "imgq_queue_depth", queue=settings.classify_queue) == 3
    assert 0 < age <= time.time() - submitted_after  # the oldest stamp is the first message's, after our clock read
    assert value(m, "imgq_queue_depth", queue=settings.train_queue) == 0
    assert value(m, "imgq_redis_up") == 1
    assert not [name for name, _ in m if name == "imgq_champion_info"]  # no worker has seeded the pointer


def test_a_scrape_never_hangs_on_a_redis_that_does_not_answer() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        client = JobStore.from_url(f"redis://127.0.0.1:{port}/0", ttl_s=60, timeout_s=0.5).r
        registry = CollectorRegistry()
        registry.register(metrics.RedisCollector(client, ["imgq.classify"]))
        out: list[bytes] = []
        scrape_thread = threading.Thread(target=lambda: out.append(generate_latest(registry)), daemon=True)
        scrape_thread.start()
        scrape_thread.join(timeout=120)  # a bound on a hang, not a speed check: the client gives up in ~0.5 s
        client.close()
    assert not scrape_thread.is_alive(), "the scrape hung on a silent Redis"
    families = {f.name: f for f in text_string_to_metric_families(out[0].decode())}
    assert [s.value for s in families["imgq_redis_up"].samples] == [0]
    assert "imgq_queue_depth" not in families


def test_a_refused_champion_counts_one_load_failure(model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    good, copy = copy_of_champion(models)
    bad = copy.name
    weights = copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with RedisServer() as server:
        store = JobStore.from_url(server.url, ttl_s=60)
        champion = Champion(models, store.r)
        watcher = ModelWatcher(champion, torch.device("cpu"), check_every_s=0)
        before = REGISTRY.get_sample_value("imgq_model_load_failures_total") or 0.0
        champion.set(bad)
        assert watcher.current().version == good  # refused: the old model keeps serving
        assert watcher.current().version == good  # and not tried again, so not counted again
        store.r.close()
    assert bad in watcher.refused
    assert REGISTRY.get_sample_value("imgq_model_load_failures_total") == before + 1


def test_a_new_champion_is_warmed_up_before_a_batch_sees_it_and_refused_if_it_cannot_run(
        model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    good, copy = copy_of_champion(models)
    warmed: list[str] = []

    def warm_up(model: Classifier) -> None:  # what Serving.warm_model does, and a record of it
        size = model.meta.input_size
        model.predict(torch.zeros(2, 3, size, size))
        warmed.append(model.version)
        if len(warmed) > 1:
            raise RuntimeError("the second new model cannot run")

    with RedisServer() as server:
        store = JobStore.from_url(server.url, ttl_s=60)
        champion = Champion(models, store.r)
        watcher = ModelWatcher(champion, torch.device("cpu"), check_every_s=0, warm_up=warm_up)
        assert warmed == []  # the first model is the engine's to warm, with the decoder (Serving.warm_up)
        champion.set(copy.name)
        assert watcher.current().version == copy.name and warmed == [copy.name]
        before = REGISTRY.get_sample_value("imgq_model_load_failures_total") or 0.0
        champion.set(good)
        assert watcher.current().version == copy.name  # its warm-up failed: the warm model keeps serving
        store.r.close()
    assert warmed == [copy.name, good] and good in watcher.refused
    assert REGISTRY.get_sample_value("imgq_model_load_failures_total") == before + 1


def test_a_failed_retrain_is_counted_by_the_trainer(private_cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    settings = private_cluster.settings
    private_cluster.start_worker("trainer@%h", queues=settings.train_queue, IMGQ_METRICS_PORT=str(port), **LOOPBACK)
    private_cluster.wait_ready()
    trigger_retrain(private_cluster.app, settings, RetrainRequest(source=str(tmp_path / "no-such-data")))
    wait_until(lambda: value(scrape(port), "imgq_retrains_total", outcome="failed") == 1, 300,
               lambda: f"the failed retrain counted:\n{private_cluster.workers[0].log_tail()}", poll_s=0.5)
    m = scrape(port)
    assert [value(m, "imgq_retrains_total", outcome=o) for o in metrics.RETRAIN_OUTCOMES] == [0, 0, 1, 0]
    assert value(m, "imgq_worker_ready") == 1  # a trainer is ready without a model: it serves no classify queue


def test_retrain_outcomes_are_named_from_the_final_event() -> None:
    assert metrics.count_retrain({"event": "done", "promoted": True}) == "promoted"
    assert metrics.count_retrain({"event": "done", "promoted": False}) == "rejected"
    assert metrics.count_retrain({"event": "failed", "reason": "x"}) == "failed"
    assert metrics.count_retrain({"event": "skipped", "reason": "x"}) == "skipped"


def test_a_private_clusters_workers_keep_metrics_on_loopback_unless_an_address_is_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGQ_METRICS_ADDR", raising=False)
    default = Settings.from_env({})
    assert default.metrics_addr == "0.0.0.0"  # a deployed worker: all interfaces
    assert LocalCluster(default, redis=False).settings.metrics_addr == "127.0.0.1"  # `imgq run`: this host only
    assert LocalCluster(default.replace(metrics_addr="::1"), redis=False).settings.metrics_addr == "::1"
    monkeypatch.setenv("IMGQ_METRICS_ADDR", "0.0.0.0")  # asked for in so many words: kept
    assert LocalCluster(Settings.from_env(), redis=False).settings.metrics_addr == "0.0.0.0"


def test_the_metrics_address_is_an_ip_address() -> None:
    assert Settings.from_env({}).metrics_addr == "0.0.0.0"  # all interfaces: the exporters' convention
    assert metrics.metrics_url(Settings.from_env({"IMGQ_METRICS_ADDR": "::1"}).metrics_addr, 9108) == \
        "http://[::1]:9108/metrics"
    with pytest.raises(SettingsError, match=r"^IMGQ_METRICS_ADDR='metrics\.example': must be an IP address"):
        Settings.from_env({"IMGQ_METRICS_ADDR": "metrics.example"})


def samples_of(collector: metrics.RedisCollector) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}
