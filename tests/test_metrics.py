"""A real `imgq worker` process's Prometheus endpoint, scraped while and after a job runs."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from imgq.redis_server import free_port
from model.pointer import champion_version
from tests.support import Cluster, ImageSite, closed_port_url

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_match_the_job(private_cluster: Cluster, image_site: ImageSite, model_dir: Path) -> None:
    port = free_port()
    private_cluster.start_worker("metered@%h", IMGQ_METRICS_PORT=str(port))
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
