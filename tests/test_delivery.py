"""Delivery guarantees that need no fault injection: `imgq reconcile`, backpressure, job-key TTLs, the
visibility-timeout check at start-up, and a Redis that refuses the very first write."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from imgq import keys
from imgq.errors import ImgqError
from imgq.jobs import JobStore
from imgq.redis_server import RedisServer
from imgq.settings import Settings
from producer.submit import submit_urls
from tests.support import TEST_ENV, Cluster, ImageSite, settings_for
from worker.app import create_app

MAX_DEPTH = 4
TTL_S = 90


def imgq(*args: str, redis_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": redis_url, **env})


def distinct_urls(site: ImageSite, n: int, tag: str) -> list[str]:
    pool = list(site.truth)
    return [f"{pool[i % len(pool)]}?{tag}={i}" for i in range(n)]


def truth_of(site: ImageSite, url: str) -> str:
    return site.truth[url.split("?")[0]]


def test_reconcile_enqueues_exactly_the_items_whose_results_were_lost(
        cluster: Cluster, image_site: ImageSite, tmp_path: Path) -> None:
    urls = distinct_urls(image_site, 40, "rec")
    url_file = tmp_path / "urls.txt"
    url_file.write_text("# submitted with imgq submit\n" + "\n".join(urls) + "\n")
    job = cluster.submit(urls)
    cluster.wait(job)
    lost = [3, 4, 17, 30, 39]
    cluster.store.r.hdel(keys.results(job), *map(str, lost))  # as if Redis lost the last writes
    assert cluster.store.status(job).state == "running"

    url = cluster.settings.redis_url
    dry = imgq("reconcile", job, str(url_file), "--dry-run", redis_url=url)
    assert dry.returncode == 0, dry.stderr
    assert f"{len(lost)} of 40 URLs had no result" in dry.stdout
    assert cluster.store.status(job).done == 40 - len(lost)

    proc = imgq("reconcile", job, str(url_file), "--batch-size", "2", redis_url=url)
    assert proc.returncode == 0, proc.stderr
    assert f"job {job}: {len(lost)} of 40 URLs had no result; enqueued again in 3 batches" in proc.stdout
    status = cluster.wait(job)
    assert (status.total, status.done, status.failed) == (40, 40, 0)
    results = cluster.results(job)
    assert [r["index"] for r in results] == list(range(40)) and [r["url"] for r in results] == urls
    assert all(r["label"] == truth_of(image_site, str(r["url"])) for r in results)

    again = imgq("reconcile", job, str(url_file), redis_url=url)
    assert again.returncode == 0 and "all 40 URLs have a result; nothing to enqueue" in again.stdout


@pytest.mark.parametrize(("lines", "needle"), [
    (lambda urls: [*urls[:10], "http://elsewhere.example/x.jpg", *urls[11:]], "does not match job"),
    (lambda urls: urls[:-1], "has 11 URLs but job"),
    (lambda urls: [*urls, urls[0]], "has 13 URLs but job"),
], ids=["another-url", "shorter", "longer"])
def test_reconcile_refuses_a_url_file_that_is_not_the_jobs(cluster: Cluster, image_site: ImageSite, tmp_path: Path,
                                                          lines, needle: str) -> None:
    urls = distinct_urls(image_site, 12, "wrong")
    job = cluster.submit(urls)
    cluster.wait(job)
    url_file = tmp_path / "other.txt"
    url_file.write_text("\n".join(lines(urls)) + "\n")
    proc = imgq("reconcile", job, str(url_file), redis_url=cluster.settings.redis_url)
    assert proc.returncode == 1 and needle in proc.stderr, proc.stderr
    missing = imgq("reconcile", "nosuchjob", str(url_file), redis_url=cluster.settings.redis_url)
    assert missing.returncode == 1 and "no job 'nosuchjob'" in missing.stderr


@pytest.fixture(scope="module")
def small_cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis of its own, a shallow queue limit, tiny batches and a short job TTL; workers started on demand."""
    with RedisServer() as server:
        c = Cluster(settings_for(server.url, model_dir, IMGQ_MAX_QUEUE_DEPTH=str(MAX_DEPTH), IMGQ_BATCH_SIZE="2",
                                 IMGQ_JOB_TTL=str(TTL_S)), tmp_path_factory.mktemp("small"))
        yield c
        c.stop()


def ensure_worker(c: Cluster) -> None:
    if not any(w.proc.poll() is None for w in c.workers):
        c.start_worker()
        c.wait_ready()


@pytest.mark.slow
def test_submit_waits_while_the_queue_is_full_and_resumes_as_a_worker_drains_it(
        small_cluster: Cluster, image_site: ImageSite) -> None:
    c = small_cluster
    for w in c.workers:
        w.stop()
    queue = c.settings.classify_queue
    urls = distinct_urls(image_site, 40, "bp")
    jobs: list[str] = []
    producer = threading.Thread(target=lambda: jobs.append(c.submit(urls)))
    producer.start()

    deadline = time.monotonic() + 30
    while c.store.r.llen(queue) < MAX_DEPTH:
        assert time.monotonic() < deadline and producer.is_alive()
        time.sleep(0.05)
    time.sleep(2)  # no worker: the producer must be parked, not filling Redis
    job = c.store.recent_jobs(1)[0]
    status = c.store.status(job)
    assert producer.is_alive()
    # kombu's Redis queue is the list under the queue's name: exactly the limit, and the job counts just that.
    assert c.store.r.llen(queue) == MAX_DEPTH
    assert (status.total, status.state) == (MAX_DEPTH * 2, "submitting")

    c.start_worker()
    depths = []
    while producer.is_alive():
        depths.append(c.store.r.llen(queue))
        time.sleep(0.02)
    producer.join()
    assert jobs == [job] and max(depths) <= MAX_DEPTH
    c.wait(job)
    results = c.results(job)
    assert [r["index"] for r in results] == list(range(40))
    assert all(r["label"] == truth_of(image_site, str(r["url"])) for r in results)


def test_every_job_key_expires_within_the_job_ttl(small_cluster: Cluster, image_site: ImageSite) -> None:
    c = small_cluster
    ensure_worker(c)
    job = c.submit([*distinct_urls(image_site, 5, "ttl"), image_site.url("no/such.jpg")])
    c.wait(job)
    found = [k.decode() for k in c.store.r.scan_iter(keys.job_pattern(job))]
    # The worker sets TTLs on the keys it writes, from the same IMGQ_JOB_TTL.
    assert sorted(found) == sorted(keys.job(job) + suffix for suffix in ("", ":results", ":deliveries"))
    ttls = {k: c.store.r.ttl(k) for k in found}
    assert all(0 < t <= TTL_S for t in ttls.values()), ttls
    assert Settings().job_ttl_s == 7 * 24 * 3600  # the default: a week


def test_submit_to_a_redis_with_no_room_at_all_fails_before_enqueuing(model_dir: Path) -> None:
    with RedisServer(config={"maxmemory": "1", "maxmemory-policy": "noeviction"}) as full:
        settings = settings_for(full.url, model_dir)
        app = create_app(settings)
        store = JobStore.from_url(full.url, ttl_s=60)
        with pytest.raises(ImgqError, match=r"Redis refused to create the job .*nothing was enqueued"):
            submit_urls(["http://127.0.0.1/x.jpg"], settings=settings, store=store, app=app)
        client = redis.Redis.from_url(full.url)
        assert client.dbsize() == 0
        client.close()
        store.r.close()
        app.close()


def test_one_visibility_timeout_feeds_every_transport_option() -> None:
    settings = Settings.from_env({"IMGQ_VISIBILITY_TIMEOUT": "90", "IMGQ_TASK_TIME_LIMIT": "60"})
    conf = create_app(settings).conf
    assert conf.broker_transport_options["visibility_timeout"] == 90
    assert conf.result_backend_transport_options["visibility_timeout"] == 90
    assert conf.task_time_limit == 60 and conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    # The sweep for expired unacked batches runs often enough that recovery is ~vt, not vt + 100 s.
    opts = conf.broker_transport_options
    assert opts["unacked_restore_interval"] * opts["unacked_restore_throttle"] <= 90 / 5


@pytest.mark.parametrize("command", [["-m", "cli", "worker"], ["-m", "celery", "-A", "worker.app", "worker"]])
def test_a_worker_refuses_to_start_with_a_time_limit_not_below_the_visibility_timeout(
        command: list[str], redis_server: RedisServer, model_dir: Path) -> None:
    env = {**os.environ, "IMGQ_REDIS_URL": redis_server.url, "IMGQ_MODEL_DIR": str(model_dir),
           "IMGQ_VISIBILITY_TIMEOUT": "60", "IMGQ_TASK_TIME_LIMIT": "60"}
    proc = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "IMGQ_TASK_TIME_LIMIT=60.0: must be below IMGQ_VISIBILITY_TIMEOUT (60 s)" in proc.stderr, proc.stderr
