"""Results out of Redis: Parquet export, and the streamed export (`imgq results JOB --follow -o DIR/`) that
moves finished results into part files and leaves one bit an index behind, with real `imgq worker`
processes, a real redis-server and the real CLI in subprocesses.

- a Parquet export holds every index once, with the JSONL record's fields; extra fields ride in every format;
- `--follow` exports every index exactly once across its parts and leaves Redis only the bitmap, the cursor
  and the job's record, and status, summary and reconcile count exported results as done;
- a worker SIGKILLed mid-job and batches delivered again after their results were exported: no second result;
- an exporter SIGKILLed between a part's rename and its commit, or at any moment, restarts without losing or
  duplicating a result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgq import keys
from imgq.celery_app import CLASSIFY_TASK
from imgq.jobs import JobStore, argsrepr, result_record
from imgq.redis_server import RedisServer
from producer.export import CSV_FIELDS
from tests.httpserver import HTTPTestServer
from tests.support import TEST_ENV, Cluster, ImageSite, one_image_site, read_jsonl, wait_until

REPO = Path(__file__).resolve().parents[1]
BATCH = int(TEST_ENV["IMGQ_BATCH_SIZE"])

# Loaded into an exporter by sitecustomize: SIGKILL itself right after part CRASH_PART is renamed into place
# (fsynced, final name) and before its commit reaches Redis: the one window where a part file exists whose
# results are still in Redis.
_CRASH_BEFORE_COMMIT = '''
import os, signal
import imgq.jobs

_commit = imgq.jobs.JobStore.commit_export

def commit_export(self, job_id, token, part, indices):
    if part == int(os.environ["IMGQ_TEST_CRASH_PART"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _commit(self, job_id, token, part, indices)

imgq.jobs.JobStore.commit_export = commit_export
'''


@pytest.fixture(scope="module")
def site(image_site: ImageSite) -> Iterator[tuple[HTTPTestServer, str]]:
    """/img.png at once, /slow.png after 0.15 s (tests.support.one_image_site)."""
    with one_image_site(image_site, slow_s=0.15) as served:
        yield served


def env_for(redis_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": redis_url, **extra}


def imgq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def start_follow(job: str, out: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", "results", job, "--follow", "-o", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen[str], timeout_s: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


def read_parts(directory: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(directory.glob("part-*")):
        rows += pq.read_table(path).to_pylist() if path.suffix == ".parquet" else read_jsonl(path)
    return rows


def assert_each_index_once(rows: list[dict[str, Any]], n: int) -> None:
    counts = Counter(int(r["index"]) for r in rows)
    assert sorted(counts) == list(range(n)), f"missing: {sorted(set(range(n)) - set(counts))[:10]}"
    assert max(counts.values()) == 1, f"duplicated: {[i for i, c in counts.items() if c > 1][:10]}"


def job_keys(store: JobStore, job: str) -> dict[str, int]:
    """Each key of the job and the bytes Redis holds for it (MEMORY USAGE)."""
    return {k.decode().removeprefix(keys.job(job)): int(store.r.memory_usage(k) or 0)
            for k in store.r.scan_iter(keys.job_pattern(job))}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parquet_holds_every_index_once_with_the_fields_of_jsonl(cluster: Cluster, image_site: ImageSite,
                                                                   tmp_path: Path) -> None:
    good = list(image_site.truth)
    urls = [*(f"{good[i % len(good)]}?pq={i}" for i in range(24)), image_site.url("no/such.jpg"),
            image_site.url("bad/page.jpg"), image_site.url("bad/truncated.jpg")]
    job = cluster.submit(urls)
    cluster.wait(job)
    env = env_for(cluster.settings.redis_url)
    for args in (["-o", str(tmp_path / "r.jsonl")], ["-o", str(tmp_path / "r.parquet")],
                 ["--format", "parquet", "-o", str(tmp_path / "r.bin")], ["-o", str(tmp_path / "r.csv")]):
        proc = imgq("results", job, *args, env=env)
        assert proc.returncode == 0 and proc.stdout == "", proc.stderr

    records = read_jsonl(tmp_path / "r.jsonl")
    assert [r["index"] for r in records] == list(range(len(urls)))
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.column_names == list(records[0])
    assert table.schema.field("topk").type == pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))
    assert table.to_pylist() == records  # the same records, field for field, failures included
    assert pq.read_table(tmp_path / "r.bin").to_pylist() == records
    assert {r["error"]["code"] for r in records if r["error"]} == {  # type: ignore[index]
        "http_status", "not_an_image", "decode_error"}
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(CSV_FIELDS) and [int(r["index"]) for r in rows] == list(range(len(urls)))

    to_stdout = imgq("results", job, "--format", "parquet", env=env)
    assert to_stdout.returncode == 2 and len(to_stdout.stderr.strip().splitlines()) == 1, to_stdout.stderr
    assert "-o FILE.parquet" in to_stdout.stderr


def test_extra_fields_of_records_ride_in_every_format(redis_server: RedisServer, tmp_path: Path) -> None:
    """Records carrying fields of their own (`--keep` columns): JSONL as written, CSV and Parquet as columns
    from the union of the fields (empty where a record lacks one)."""
    store = JobStore.from_url(redis_server.url, ttl_s=600)
    job = store.create_job()
    store.add_batches(job, items=4, batches=1)
    store.finish_submission(job)
    records = [result_record(i, f"http://127.0.0.1:9/{i}.jpg", topk=[("circle", 0.9), ("star", 0.1)],
                             model_version="v1") for i in range(4)]
    records[0] |= {"sku": 7, "title": "red"}
    records[1] |= {"sku": 8}
    records[2] |= {"title": "blue", "tags": ["a", "b"]}
    assert store.write_results(job, records) == 4
    env = env_for(redis_server.url)
    for name in ("x.jsonl", "x.csv", "x.parquet"):
        proc = imgq("results", job, "-o", str(tmp_path / name), env=env)
        assert proc.returncode == 0, proc.stderr

    assert read_jsonl(tmp_path / "x.jsonl") == records
    with open(tmp_path / "x.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [*CSV_FIELDS, "sku", "title", "tags"]
    assert [(r["sku"], r["title"], r["tags"]) for r in rows] == [("7", "red", ""), ("8", "", ""),
                                                               ("", "blue", '["a", "b"]'), ("", "", "")]
    table = pq.read_table(tmp_path / "x.parquet")
    assert [table.schema.field(c).type for c in ("sku", "title", "tags")] == [pa.int64(), pa.string(), pa.string()]
    assert table.column("sku").to_pylist() == [7, 8, None, None]
    assert table.column("tags").to_pylist() == [None, None, '["a", "b"]', None]
    store.r.close()


def test_every_check_of_the_store_sees_an_exported_index_as_done(redis_server: RedisServer, tmp_path: Path) -> None:
    """Each layer on its own: the write's first-wins, the claim, unfinished and missing_indices."""
    store = JobStore.from_url(redis_server.url, ttl_s=600)
    job = store.create_job()
    store.add_batches(job, items=6, batches=1)
    store.finish_submission(job)
    records = [result_record(i, f"http://127.0.0.1:9/{i}.jpg", topk=[("circle", 0.9)], model_version="v1")
               for i in range(4)]
    assert store.write_results(job, records) == 4
    proc = subprocess.Popen([sys.executable, "-m", "cli", "results", job, "--follow", "-o", str(tmp_path / "p"),
                             "--part-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_for(redis_server.url))
    wait_until(lambda: store.export_state(job).get("part") == "1", 60, "the first part committed")
    assert store.results_in_redis(job) == 0

    late = [result_record(i, f"http://127.0.0.1:9/{i}.jpg", model_version="v2") for i in range(6)]
    assert store.write_results(job, late[:4]) == 0  # exported: refused, as a second HSETNX would be
    assert store.claim_batch(job, 0, [0, 1, 2, 3], token="t", lease_ms=1000).state == "done"
    items = [(i, str(r["url"])) for i, r in enumerate(late)]
    assert store.unfinished(job, items) == items[4:]
    assert store.missing_indices(job, 6) == [4, 5]
    assert store.write_results(job, late) == 2
    status = store.status(job)
    assert (status.done, status.exported, status.state) == (6, 4, "done")
    code, _, err = finish(proc)
    assert code == 0, err
    rows = read_parts(tmp_path / "p")
    assert_each_index_once(rows, 6)
    assert [r["model_version"] for r in sorted(rows, key=lambda r: r["index"])] == ["v1"] * 4 + ["v2"] * 2
    store.r.close()


def test_follow_exports_every_index_once_and_leaves_redis_one_bit_an_index(
        cluster: Cluster, image_site: ImageSite, tmp_path: Path) -> None:
    good = list(image_site.truth)
    urls = [f"{good[i % len(good)]}?follow={i}" for i in range(200)]
    env = env_for(cluster.settings.redis_url)
    job = cluster.submit(urls)
    parts = tmp_path / "parts"
    code, out, err = finish(start_follow(job, parts, "--part-size", "32", env=env))  # runs alongside the worker
    assert code == 0, err

    printed = [Path(line) for line in out.splitlines()]
    assert printed == sorted(parts.glob("part-*.parquet")) and len(printed) >= 200 // 32
    rows = read_parts(parts)
    assert_each_index_once(rows, len(urls))
    assert all(r["url"] == urls[r["index"]] and r["label"] == image_site.truth[r["url"].split("?")[0]] for r in rows)

    # Redis keeps the job's record, its delivery counts, the bitmap and the cursor: no result, no payload.
    held = job_keys(cluster.store, job)
    assert sorted(held) == ["", ":deliveries", ":export", ":exported"], held
    assert cluster.store.r.bitcount(keys.exported(job)) == len(urls)
    assert sum(held.values()) < 16 * len(urls), held
    status = cluster.store.status(job)
    assert (status.done, status.exported, status.state) == (len(urls), len(urls), "done")

    # Every other reader counts exported results as done.
    shown = json.loads(imgq("status", job, "--json", env=env).stdout)
    assert (shown["done"], shown["pending"], shown["exported"]) == (len(urls), 0, len(urls))
    summary = json.loads(imgq("results", job, "--summary", "--json", env=env).stdout)
    assert (summary["results"], summary["missing"], summary["exported"]) == (0, 0, len(urls))
    url_file = tmp_path / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    dry = imgq("reconcile", job, str(url_file), "--dry-run", env=env)
    assert dry.returncode == 0 and f"all {len(urls)} URLs have a result" in dry.stdout, dry.stdout + dry.stderr

    again = finish(start_follow(job, parts, "--part-size", "32", env=env))
    assert again[0] == 0 and again[1] == "" and "no new results" in again[2], again
    assert sorted(parts.glob("part-*")) == printed
    elsewhere = finish(start_follow(job, tmp_path / "other", env=env))
    assert elsewhere[0] == 1 and len(elsewhere[2].strip().splitlines()) == 1, elsewhere
    assert f"already exported to {parts}" in elsewhere[2]


@pytest.mark.slow
def test_exported_results_get_no_second_result_from_a_killed_worker_or_a_batch_delivered_again(
        make_cluster: Callable[..., Cluster], site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    server, label = site
    cluster = make_cluster()
    victim = cluster.start_worker("victim@%h")
    cluster.start_worker("survivor@%h")
    cluster.wait_ready(2)
    urls = [server.url(f"/slow.png?i={i}") for i in range(320)]
    job = cluster.submit(urls)
    env = env_for(cluster.settings.redis_url)
    parts = tmp_path / "parts"
    exporter = start_follow(job, parts, "--part-size", "16", "--format", "jsonl", env=env)

    wait_until(lambda: int(cluster.store.export_state(job).get("part", 0)) >= 3, 120, "three committed parts")
    assert cluster.store.r.hlen("unacked") > 0, "the victim held no batch: nothing to deliver again"
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the whole worker, with the batches it holds
    victim.proc.wait()
    assert cluster.store.status(job).done < len(urls), "job finished before the kill; make it longer"
    code, _, err = finish(exporter)
    assert code == 0, err
    assert max(cluster.store.delivery_counts(job).values()) >= 2, "no batch was delivered again"

    # Copies of finished, exported batches, as a late redelivery or the sweep would send them.
    sent = []
    for batch in (0, 1, 7):
        items = [[i, urls[i]] for i in range(batch * BATCH, (batch + 1) * BATCH)]
        sent.append(cluster.app.send_task(CLASSIFY_TASK, args=[job, batch, items],
                                          queue=cluster.settings.classify_queue,
                                          argsrepr=argsrepr(job, batch, len(items))).id)
    survivor_log = cluster.workers[1].log_path
    wait_until(lambda: all(f"imgq.classify[{tid}] succeeded" in survivor_log.read_text(errors="replace")
                           for tid in sent), 120, "the copies handled")

    status = cluster.store.status(job)
    assert (status.done, status.exported) == (len(urls), len(urls))
    assert not cluster.store.r.exists(keys.results(job)), "a copy wrote a result for an exported index"
    again = finish(start_follow(job, parts, "--format", "jsonl", env=env))
    assert again[0] == 0 and "no new results" in again[2], again
    rows = read_parts(parts)
    assert_each_index_once(rows, len(urls))
    assert {r["label"] for r in rows} == {label} and not any(r["error"] for r in rows)


def test_an_exporter_killed_between_rename_and_commit_restarts_without_a_duplicate(
        cluster: Cluster, image_site: ImageSite, tmp_path: Path) -> None:
    good = list(image_site.truth)
    urls = [f"{good[i % len(good)]}?crash={i}" for i in range(100)]
    job = cluster.submit(urls)
    cluster.wait(job)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent(_CRASH_BEFORE_COMMIT))
    parts = tmp_path / "parts"
    crashing = env_for(cluster.settings.redis_url, PYTHONPATH=os.pathsep.join([str(inject), str(REPO)]),
                       IMGQ_TEST_CRASH_PART="1")
    code, out, _ = finish(start_follow(job, parts, "--part-size", "16", env=crashing))
    assert code == -signal.SIGKILL
    assert [Path(line).name for line in out.splitlines()] == ["part-00000.parquet"]
    # Part 1 is on disk under its final name, and its 16 results are still in Redis: the crash window.
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert cluster.store.export_state(job)["part"] == "1"
    assert cluster.store.results_in_redis(job) == len(urls) - 16
    committed = digest(parts / "part-00000.parquet")

    code, out, err = finish(start_follow(job, parts, "--part-size", "16", env=env_for(cluster.settings.redis_url)))
    assert code == 0, err
    assert "removed part-00001.parquet" in err
    assert Path(out.splitlines()[0]).name == "part-00001.parquet"
    assert digest(parts / "part-00000.parquet") == committed  # a committed part is never rewritten
    assert_each_index_once(read_parts(parts), len(urls))
    assert cluster.store.results_in_redis(job) == 0 and cluster.store.status(job).exported == len(urls)


def test_an_exporter_sigkilled_mid_job_restarts_and_loses_and_duplicates_nothing(
        cluster: Cluster, site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    server, label = site
    urls = [server.url(f"/slow.png?kill={i}") for i in range(320)]
    job = cluster.submit(urls)
    env = env_for(cluster.settings.redis_url)
    parts = tmp_path / "parts"
    first = start_follow(job, parts, "--part-size", "8", env=env)
    wait_until(lambda: int(cluster.store.export_state(job).get("part", 0)) >= 2, 120, "two committed parts")
    first.kill()  # SIGKILL, wherever it is: reading, writing a part, renaming, committing
    _, out, _ = finish(first)
    assert cluster.store.status(job).state != "done" or cluster.store.results_in_redis(job) > 0, \
        "nothing was left to export after the kill; make the job longer"
    before = {Path(line).name: digest(Path(line)) for line in out.splitlines()}
    assert len(before) >= 2

    code, _, err = finish(start_follow(job, parts, "--part-size", "8", env=env))
    assert code == 0, err
    assert all(digest(parts / name) == d for name, d in before.items())  # printed parts stay as they were
    rows = read_parts(parts)
    assert_each_index_once(rows, len(urls))
    assert {r["label"] for r in rows} == {label}
    assert not any(p.name.endswith(".tmp") for p in parts.iterdir())
