"""The `imgq` CLI against a real Redis and worker: submit, status, results, worker start-up checks."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgq import keys
from imgq.errors import SettingsError
from imgq.settings import Settings
from producer.sources import read_urls, rereader
from tests.support import TEST_ENV, Cluster, ImageSite


def imgq(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env={**os.environ, **env}, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_wait_status_and_results_through_the_cli(cluster: Cluster, image_site: ImageSite,
                                                        tmp_path: Path) -> None:
    env = {**TEST_ENV, "IMGQ_REDIS_URL": cluster.settings.redis_url}
    urls = list(image_site.truth)[:10]
    out = tmp_path / "r.jsonl"
    proc = imgq("submit", "-", "--wait", "-o", str(out), "--batch-size", "3", env=env,
                stdin="# header comment\n" + "\n\n".join(urls) + "\n")
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().splitlines()[-1]  # the job id is the last line
    assert len(job) == 32
    assert [json.loads(line)["url"] for line in out.read_text().splitlines()] == urls

    status = imgq("status", job, "--json", env=env)
    assert json.loads(status.stdout) == {"job_id": job, "total": 10, "done": 10, "failed": 0, "pending": 0,
                                         "state": "done", "dead_batches": 0}
    assert cluster.store.status(job).total == 10 and cluster.store.r.hget(keys.job(job), "batches") == b"4"

    as_csv = imgq("results", job, "--format", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["url"] for r in rows] == urls
    assert all(r["label"] == image_site.truth[r["url"]] and float(r["confidence"]) > 0 for r in rows)
    assert set(rows[0]) == {"index", "url", "label", "confidence", "model_version", "error_code", "error_message"}


def test_status_of_an_unknown_job_is_a_clear_error(cluster: Cluster) -> None:
    proc = imgq("status", "nope", env={"IMGQ_REDIS_URL": cluster.settings.redis_url})
    assert proc.returncode == 1
    assert "no job 'nope'" in proc.stderr


def test_worker_refuses_to_start_without_a_model(redis_server, tmp_path: Path) -> None:
    proc = imgq("worker", env={"IMGQ_REDIS_URL": redis_server.url, "IMGQ_MODEL_DIR": str(tmp_path / "empty")},
                timeout=60)
    assert proc.returncode == 1
    assert "imgq train --data demo" in proc.stderr


def test_celery_tooling_reaches_imgq_workers(cluster: Cluster) -> None:
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.app", "inspect", "ping"],
                          env={**os.environ, "IMGQ_REDIS_URL": cluster.settings.redis_url},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pong" in proc.stdout


def test_a_bad_setting_fails_at_start_up_naming_the_variable() -> None:
    proc = imgq("status", "x", env={"IMGQ_DEVICE": "tpu"})
    assert proc.returncode == 1
    assert "IMGQ_DEVICE='tpu'" in proc.stderr and "auto, cpu, cuda" in proc.stderr


@pytest.mark.parametrize(("env", "needle"), [
    ({"IMGQ_BATCH_SIZE": "lots"}, "IMGQ_BATCH_SIZE='lots' is not a valid int"),
    ({"IMGQ_BATCH_SIZE": "0"}, "IMGQ_BATCH_SIZE=0: must be > 0"),
    ({"IMGQ_REDIS_URL": "localhost:6379"}, "must start with redis://"),
    ({"IMGQ_ALLOW_NETWORKS": "127.0.0.0/8,nonsense"}, "'nonsense' is not a CIDR network"),
    ({"IMGQ_TASK_TIME_LIMIT": "600"}, "must be below IMGQ_VISIBILITY_TIMEOUT"),
])
def test_settings_errors_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle.replace("(", r"\(")):
        Settings.from_env(env)


def test_settings_round_trip_through_the_environment() -> None:
    s = Settings.from_env({"IMGQ_ALLOW_NETWORKS": "10.0.0.0/8, ::1/128", "IMGQ_FETCH_TIMEOUT": "2.5"})
    assert s.allow_networks == ("10.0.0.0/8", "::1/128") and s.fetch_timeout_s == 2.5
    assert Settings.from_env(s.to_env()) == s
    assert s.replace(batch_size=None, topk=5).topk == 5


def test_url_files_skip_blanks_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "urls.txt"
    f.write_text("# comment\n\n  http://a/1.jpg  \nhttp://a/2.jpg\n   # indented comment\n")
    assert list(read_urls(f)) == ["http://a/1.jpg", "http://a/2.jpg"]
    # a waiting producer reads a file again to find what a stalled job is missing; stdin cannot be re-read
    again = rereader(f)
    assert again is not None and list(again()) == list(again()) == ["http://a/1.jpg", "http://a/2.jpg"]
    assert rereader("-") is None
