"""Exactly one result per URL through the faults of issue 12 that the delivery core closes, with real `imgq
worker` processes and a real redis-server:

- a forward pass that raises (a stand-in model, injected into the worker) ends its batch `internal`;
- a batch that outlives the visibility timeout on a live worker is waited for, never charged a lost delivery;
- Redis restarted empty mid-job: late writes resurrect nothing, `imgq status` says what was lost and
  `imgq reconcile` recreates the job from the URL file;
- a batch lost between kombu's BRPOP and its unacked record comes back by itself (the workers' sweep), with
  no producer waiting.

Faults are injected with a sitecustomize.py on the worker's PYTHONPATH that wraps one Serving method.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from imgq import keys
from imgq.local import WorkerProcess
from imgq.redis_server import RedisServer, free_port
from tests.httpserver import HTTPTestServer
from tests.support import TEST_ENV, Cluster, ImageSite, every_index_once, one_image_site, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_RECEIVED = re.compile(r"Task imgq\.classify\[([\w-]+)\] received")
_FINISHED = re.compile(r"Task imgq\.classify\[([\w-]+)\] (?!received)")
BATCH = int(TEST_ENV["IMGQ_BATCH_SIZE"])

# Wraps Serving.fetch_prepare to remember the batch's URLs per thread, and Serving.predict to misbehave for a
# batch with MARKER in a URL. "raise": the model's forward raises, in the batcher's thread (one batch at a time
# with IMGQ_CONCURRENCY=1, so no other batch shares that forward pass). "sleep": sleeps SLEEP_S before the
# forward, once across all processes (a flag file).
_INJECT = '''
import os, threading, time
import model.classifier
import worker.serving as serving

MARKER, MODE = os.environ["IMGQ_TEST_MARKER"], os.environ["IMGQ_TEST_MODE"]
_local = threading.local()
_explode = threading.Event()
_fetch_prepare, _predict = serving.Serving.fetch_prepare, serving.Serving.predict
_forward = model.classifier.Classifier.predict

def fetch_prepare(self, urls, model, **kw):
    _local.urls = list(urls)
    return _fetch_prepare(self, urls, model, **kw)

def predict(self, model, tensors):
    marked = any(MARKER in u for u in getattr(_local, "urls", ()))
    if MODE == "raise":
        (_explode.set if marked else _explode.clear)()
    elif marked:
        try:
            os.close(os.open(os.environ["IMGQ_TEST_FLAG"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            time.sleep(float(os.environ["IMGQ_TEST_SLEEP_S"]))
    return _predict(self, model, tensors)

def forward(self, batch, k=3):
    if _explode.is_set():
        raise RuntimeError("stand-in model: the forward pass exploded")
    return _forward(self, batch, k=k)

serving.Serving.fetch_prepare, serving.Serving.predict = fetch_prepare, predict
model.classifier.Classifier.predict = forward
'''


@pytest.fixture(scope="module")
def site(image_site: ImageSite) -> Iterator[tuple[HTTPTestServer, str]]:
    """/img.png at once, /slow.png after 0.5 s (tests.support.one_image_site)."""
    with one_image_site(image_site, slow_s=0.5) as served:
        yield served


def injected(tmp_path: Path, **env: str) -> dict[str, str]:
    """Worker environment that loads the fault injection above."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(textwrap.dedent(_INJECT))
    return {"PYTHONPATH": os.pathsep.join([str(inject), str(REPO)]), **env}




def codes(results: list[dict[str, object]]) -> Counter[str]:
    return Counter(str(r["error"]["code"]) for r in results if r["error"])  # type: ignore[index]


def deliveries(cluster: Cluster, job: str) -> dict[int, int]:
    return cluster.store.delivery_counts(job)


def logs(cluster: Cluster) -> str:
    return "\n".join(w.log_path.read_text(errors="replace") for w in cluster.workers)


def running_tasks(worker: WorkerProcess) -> int:
    """Classify tasks this worker received and has not finished, from its log (Celery logs both at INFO)."""
    text = worker.log_path.read_text(errors="replace")
    return sum((Counter(_RECEIVED.findall(text)) - Counter(_FINISHED.findall(text))).values())


def report(name: str, seconds: float) -> None:
    print(f"\n[measured] {name}: {seconds:.1f} s")  # shown with -s; the figures the README quotes


def test_a_forward_pass_that_raises_ends_its_batch_internal_and_the_rest_of_the_job_completes(
        make_cluster: Callable[..., Cluster], site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    server, label = site
    cluster = make_cluster()
    cluster.start_worker(**injected(tmp_path, IMGQ_TEST_MARKER="explode", IMGQ_TEST_MODE="raise",
                                    IMGQ_CONCURRENCY="1"))
    cluster.wait_ready()
    n, bad_batch = 4 * BATCH, 1
    urls = [server.url(f"/img.png?i={i}") for i in range(n)]
    urls[bad_batch * BATCH + 3] = server.url("/img.png?explode")
    job = cluster.submit(urls)

    cluster.wait(job, timeout_s=60)
    results = every_index_once(cluster, job, n)
    in_bad = range(bad_batch * BATCH, (bad_batch + 1) * BATCH)
    failed = [r for r in results if r["index"] in in_bad]
    assert codes(failed) == {"internal": BATCH}
    message = str(failed[0]["error"]["message"])  # type: ignore[index]
    assert "the forward pass" in message and "RuntimeError: stand-in model: the forward pass exploded" in message
    others = [r for r in results if r["index"] not in in_bad]
    assert not codes(others) and {r["label"] for r in others} == {label}
    assert cluster.store.status(job).failed == BATCH
    # Acknowledged once, finished: not delivered again, nothing left pending.
    assert deliveries(cluster, job) == {b: 1 for b in range(4)}
    assert not cluster.store.r.exists(keys.pending(job))
    assert all(w.proc.poll() is None for w in cluster.workers)


def test_a_batch_that_outlives_the_visibility_timeout_on_a_live_worker_is_waited_for_not_charged(
        make_cluster: Callable[..., Cluster], site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    server, label = site
    vt = float(TEST_ENV["IMGQ_VISIBILITY_TIMEOUT"])
    stall_s = vt + 4  # past the visibility timeout and kombu's restore sweep (every vt/5 s)
    # IMGQ_MAX_DELIVERIES=1: a second counted delivery would end the batch worker_lost.
    cluster = make_cluster(IMGQ_MAX_DELIVERIES="1")
    env = injected(tmp_path, IMGQ_TEST_MARKER="stall", IMGQ_TEST_MODE="sleep", IMGQ_TEST_SLEEP_S=str(stall_s),
                   IMGQ_TEST_FLAG=str(tmp_path / "stalled-once"))
    cluster.start_worker("a@%h", **env)
    cluster.start_worker("b@%h", **env)
    cluster.wait_ready(2)
    n, slow_batch = 4 * BATCH, 2
    urls = [server.url(f"/img.png?i={i}") for i in range(n)]
    urls[slow_batch * BATCH] = server.url("/img.png?stall")
    start = time.monotonic()
    job = cluster.submit(urls)

    cluster.wait(job, timeout_s=90)
    took = time.monotonic() - start
    results = every_index_once(cluster, job, n)
    assert not codes(results) and {r["label"] for r in results} == {label}
    assert (tmp_path / "stalled-once").exists()
    text = logs(cluster)
    # kombu did deliver the stalled batch again while its worker lived, and the copy waited instead of counting.
    assert f"batch {slow_batch}: delivered again while a live worker holds its lease" in text, text[-3000:]
    assert deliveries(cluster, job) == {b: 1 for b in range(4)}
    assert cluster.store.status(job).dead_batches == 0
    assert not list(cluster.store.r.scan_iter(keys.job(job) + ":lease:*"))
    # The copy sees the batch done at its next poll, a moment after the holder's write ended the job.
    done_after = re.compile(rf"batch {slow_batch}: waited ([\d.]+) s for the lease; the batch is done")
    wait_until(lambda: done_after.search(logs(cluster)) is not None, 30, lambda: logs(cluster)[-3000:])
    waited = done_after.search(logs(cluster))
    assert waited is not None
    report(f"batch stalled {stall_s:g} s on a live worker (vt {vt:g} s) -> job done, counter 1", took)
    report("the redelivered copy waited for the live holder", float(waited[1]))


def test_redis_restarted_empty_mid_job_resurrects_nothing_and_reconcile_recreates_the_job(
        make_cluster: Callable[..., Cluster], site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    server, label = site
    port = free_port()
    first = RedisServer(port).start()  # no persistence: a restart comes back empty
    cluster = make_cluster(first)
    worker = cluster.start_worker()
    cluster.wait_ready()
    urls = [server.url(f"/slow.png?i={i}") for i in range(30 * BATCH)]
    url_file = tmp_path / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    job = cluster.submit(urls)
    wait_until(lambda: cluster.store.status(job).done >= 2 * BATCH, 60, "the first batches")

    assert first.proc is not None
    first.proc.kill()  # a crash, not a clean shutdown
    first.proc.wait()
    # Down for 2 s, as a real restart takes: an instant one (~50 ms) can wedge kombu's consumer (see the report).
    time.sleep(2)
    second = RedisServer(port).start()
    restarted = time.monotonic()
    admin = redis.Redis.from_url(second.url)
    try:
        restarts = 0

        def supervise() -> bool:
            """Like a restart policy: kombu 5.7 sometimes crashes during the reconnect (README, known limits),
            having handed back what it held to the new Redis. Any other death fails the test."""
            nonlocal worker, restarts
            if worker.proc.poll() is None:
                return True
            assert "'NoneType' object has no attribute 'hostname'" in worker.log_tail(400), worker.log_tail()
            restarts += 1
            worker = cluster.start_worker()
            return False

        # The batches in flight at the crash finish against the empty Redis; each is dropped with a warning.
        def settled() -> bool:
            if not supervise() or "Redis has no record of this job" not in logs(cluster):
                return False
            # Not a Celery ping: after a restart kombu may consume again without its broadcast subscription.
            seen.update(running=running_tasks(worker), queued=admin.llen(cluster.settings.classify_queue),
                        unacked=admin.hlen("unacked"))
            return seen["running"] == seen["queued"] == seen["unacked"] == 0

        seen: dict[str, object] = {}
        wait_until(settled, 90, lambda: f"the in-flight batches to be dropped and the worker to be idle: {seen}")
        dropped = time.monotonic() - restarted

        # Nothing of the job came back: no fragment of a job hash, no key without the job, no key without a TTL.
        assert not list(admin.scan_iter(keys.job_pattern(job)))
        found = list(admin.scan_iter(keys.PREFIX + ":*"))
        assert all(admin.pttl(k) > 0 for k in found), {k: admin.pttl(k) for k in found}

        env = {**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": second.url}
        status = subprocess.run([sys.executable, "-m", "cli", "status", job], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 1
        assert "Traceback" not in status.stderr and len(status.stderr.strip().splitlines()) == 1, status.stderr
        assert f"no job {job!r} in Redis" in status.stderr and f"imgq reconcile {job} URLS" in status.stderr

        proc = subprocess.run([sys.executable, "-m", "cli", "reconcile", job, str(url_file)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"job record was lost: recreated from {url_file} with {len(urls)} URLs" in proc.stdout, proc.stdout
        wait_until(lambda: supervise() and cluster.store.status(job).state == "done", 120,
                   lambda: f"the reconciled job: {cluster.store.status(job)}\n{worker.log_tail()}")
        results = every_index_once(cluster, job, len(urls))
        assert not codes(results) and {r["label"] for r in results} == {label}
        assert all(admin.ttl(k) > 0 for k in admin.scan_iter(keys.job_pattern(job)))
        assert restarts <= 1
        report("Redis restarted empty -> in-flight batches dropped, worker idle", dropped)
        report("Redis restarted empty -> reconcile completed the job", time.monotonic() - restarted)
    finally:
        admin.close()
        cluster.stop()  # workers first, while their Redis is up
        second.stop()


def test_a_batch_lost_between_brpop_and_its_unacked_record_comes_back_with_no_producer_waiting(
        make_cluster: Callable[..., Cluster], site: tuple[HTTPTestServer, str]) -> None:
    """As the worker killed between kombu's BRPOP and its unacked record: the batch is gone from the broker.
    Nobody waits with the URL file; the workers' sweep sends it again from the payload kept in Redis."""
    server, label = site
    cluster = make_cluster()
    n = 100
    urls = [server.url(f"/img.png?i={i}") for i in range(n)]
    job = cluster.submit(urls)  # no worker yet: every batch waits in the queue
    queue = cluster.settings.classify_queue
    assert cluster.store.r.llen(queue) == -(-n // BATCH)
    assert cluster.store.r.rpop(queue) is not None  # the oldest batch, 0, as a killed worker's BRPOP took it
    cluster.start_worker()
    cluster.wait_ready()
    ready = time.monotonic()

    cluster.wait(job, timeout_s=90)  # no urls: no producer-side repair
    back = time.monotonic() - ready
    results = every_index_once(cluster, job, n)
    assert not codes(results) and {r["label"] for r in results} == {label}
    assert f"job {job} batch 0: not queued, not unacknowledged and not leased in two sweeps" in logs(cluster)
    assert deliveries(cluster, job) == {b: 1 for b in range(-(-n // BATCH))}
    assert not cluster.store.r.exists(keys.pending(job))
    assert job.encode() not in cluster.store.r.smembers(keys.ACTIVE_JOBS)
    report(f"batch lost in transit -> sent again by the sweep (IMGQ_SWEEP_INTERVAL={TEST_ENV['IMGQ_SWEEP_INTERVAL']}"
           " s), job complete, from worker ready", back)


def test_sigkill_of_a_worker_mid_batch_still_counts_a_delivery_and_the_survivor_finishes(
        make_cluster: Callable[..., Cluster], site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    """The other side of the lease: a worker that really dies stops renewing, its lease lapses, and the
    redelivered copy counts (so a poison batch still reaches IMGQ_MAX_DELIVERIES; see test_faults)."""
    server, label = site
    cluster = make_cluster()
    env = injected(tmp_path, IMGQ_TEST_MARKER="stall", IMGQ_TEST_MODE="sleep", IMGQ_TEST_SLEEP_S="60",
                   IMGQ_TEST_FLAG=str(tmp_path / "stalled-once"))
    victim = cluster.start_worker("victim@%h", **env)
    cluster.wait_ready()
    urls = [server.url(f"/img.png?i={i}") for i in range(BATCH)]
    urls[0] = server.url("/img.png?stall")
    job = cluster.submit(urls)
    wait_until(lambda: (tmp_path / "stalled-once").exists(), 60, "the victim to stall on the batch")
    assert cluster.store.r.exists(keys.lease(job, 0))
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    killed = time.monotonic()
    cluster.start_worker("survivor@%h", **env)  # the flag is taken: the survivor does not stall

    cluster.wait(job, timeout_s=90)
    results = every_index_once(cluster, job, BATCH)
    assert not codes(results) and {r["label"] for r in results} == {label}
    assert deliveries(cluster, job) == {0: 2}
    report("worker SIGKILLed holding a leased batch -> survivor finished it (delivery 2)", time.monotonic() - killed)
