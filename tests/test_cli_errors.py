"""The operator's experience of the `imgq` CLI, through the real command as a subprocess: every failure is one
line on stderr with a documented exit code (never a traceback), stdout carries data only, progress is
honest, Ctrl-C keeps what is done, and client commands never import torch.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from imgq import keys
from imgq.errors import ExitCode
from imgq.redis_server import RedisServer, free_port
from tests.httpserver import HTTPTestServer, trickle
from tests.support import TEST_ENV, Cluster, ImageSite, read_jsonl, wait_until

JOB = "ab" * 16  # a well-formed job id no Redis knows


def imgq(*args: str, env: dict[str, str], stdin: str | bytes | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    # surrogateescape: bytes that are not UTF-8 reach the command as they are
    return subprocess.run([sys.executable, "-m", "cli", *args], env={**os.environ, **TEST_ENV, **env},
                          input=stdin.decode(errors="surrogateescape") if isinstance(stdin, bytes) else stdin,
                          capture_output=True, encoding="utf-8", errors="surrogateescape", timeout=timeout)


def one_line(proc: subprocess.CompletedProcess[str], code: int = ExitCode.FAILED) -> str:
    """The failure's one stderr line, after checking there is exactly one, no traceback, and the exit code."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert lines[0].startswith("imgq"), lines[0]
    return lines[0]


def answered_at_submit(n: int) -> bytes:
    """A URL file whose every line is invalid UTF-8: the submitter itself answers each with `invalid_url`, so
    the job is done without any worker."""
    return b"".join(b"http://127.0.0.1/\xff%d.jpg\n" % i for i in range(n))


@pytest.fixture
def redis_env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return {"IMGQ_REDIS_URL": redis_server.url, "IMGQ_MODEL_DIR": str(tmp_path / "models")}


@pytest.fixture
def done_job(redis_env: dict[str, str], tmp_path: Path) -> tuple[str, Path]:
    """A finished job of 3000 items (and its URL file), made without a worker."""
    url_file = tmp_path / "urls.txt"
    url_file.write_bytes(answered_at_submit(3000))
    proc = imgq("submit", str(url_file), env=redis_env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), url_file


# -- wrong input, wrong invocations ----------------------------------------------------------------------

def test_submit_of_a_missing_file_is_one_line_and_leaves_no_job(redis_env: dict[str, str],
                                                               redis_server: RedisServer) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    before = set(admin.keys(keys.job("*")))
    line = one_line(imgq("submit", "/no/such/file", env=redis_env))
    assert "/no/such/file: No such file or directory" in line
    assert set(admin.keys(keys.job("*"))) == before  # the file is read before a job is created
    recent = imgq("status", "--json", env=redis_env)
    assert recent.returncode == 0 and '"state": "submitting"' not in recent.stdout
    admin.close()


def test_run_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    line = one_line(imgq("run", "/no/such/file", env={"IMGQ_MODEL_DIR": str(tmp_path)}))
    assert "/no/such/file" in line


@pytest.mark.parametrize(("args", "needle"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["status", "--bogus"], "unrecognized arguments: --bogus"),
    (["submit", "urls.txt", "--batch-size", "0"], "--batch-size: must be > 0"),
    (["run", "urls.txt", "--workers", "many"], "--workers: 'many' is not a whole number"),
    (["models", "frob"], "invalid choice: 'frob'"),
    (["results"], "the following arguments are required: job"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line_and_exit_2(args: list[str], needle: str) -> None:
    line = one_line(imgq(*args, env={}), ExitCode.USAGE)
    assert needle in line and "-h`" in line


def test_wrong_state_and_input_is_one_line_each(redis_env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    out = tmp_path / "never.jsonl"
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["status", JOB], {}, f"no job '{JOB}' in Redis"),
        (["results", JOB, "-o", str(out)], {}, f"no job '{JOB}' in Redis"),
        (["results", JOB, "--summary", "--json"], {}, f"no job '{JOB}' in Redis"),
        (["report", JOB, "-o", str(tmp_path / "r.html")], {}, f"no job '{JOB}' in Redis"),
        (["reconcile", JOB, "/no/such/urls.txt"], {}, "/no/such/urls.txt: No such file or directory"),
        (["reconcile", "nope", str(empty)], {}, "not an imgq job id"),
        (["submit", str(empty)], {}, "holds no URL"),
        (["submit", str(tmp_path)], {}, "Is a directory"),
        (["status"], {"IMGQ_BATCH_SIZE": "lots"}, "IMGQ_BATCH_SIZE='lots'"),
        (["status"], {"IMGQ_REDIS_TIMEOUT": "0"}, "IMGQ_REDIS_TIMEOUT=0.0: must be > 0"),
        (["status"], {"IMGQ_REDIS_URL": "localhost:6379"}, "IMGQ_REDIS_URL='localhost:6379': must start with"),
        (["demo-data", str(not_a_dir / "sub")], {}, "Not a directory"),
        (["models", "promote", "20990101T000000Z-deadbeef"], {}, "no model version '20990101T000000Z-deadbeef'"),
        (["models", "promote"], {}, "name the version"),
    ]
    for args, env, needle in cases:
        line = one_line(imgq(*args, env={**redis_env, **env}))
        assert needle in line, (args, line)
    assert not out.exists()  # an unknown job creates no empty results file


def test_a_bug_is_one_line_with_a_hint_and_its_traceback_under_verbose(redis_env: dict[str, str],
                                                                       done_job: tuple[str, Path],
                                                                       tmp_path: Path) -> None:
    job, _ = done_job
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import producer.export\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('boom')\n"
        "producer.export.export_results = broken\n")
    env = {**redis_env, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    line = one_line(imgq("results", job, env=env))
    assert "unexpected error: RuntimeError: boom" in line and "rerun with -v" in line
    verbose = imgq("-v", "results", job, env=env)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == line


# -- Redis that does not answer, or wants a password -----------------------------------------------------

CLIENT_COMMANDS = [["status"], ["status", JOB], ["results", JOB], ["report", JOB], ["submit", "URLS"],
                   ["reconcile", JOB, "URLS"]]


@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=" ".join)
def test_unreachable_redis_fails_fast_in_one_line_without_the_password(args: list[str], tmp_path: Path) -> None:
    url_file = tmp_path / "urls.txt"
    url_file.write_text("http://127.0.0.1/a.jpg\n")
    port = free_port()  # nothing listens there
    env = {"IMGQ_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}
    start = time.monotonic()
    proc = imgq(*[str(url_file) if a == "URLS" else a for a in args], env=env, timeout=120)
    took = time.monotonic() - start
    line = one_line(proc)
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in line and "IMGQ_REDIS_TIMEOUT" in line
    assert "hunter2" not in proc.stderr
    print(f"imgq {' '.join(args)}: failed in {took:.1f} s")  # measured for the README (-s shows it)
    assert took < 60  # today's 30-80 s of silent retries are gone; the bound is IMGQ_REDIS_TIMEOUT + start-up


def test_a_redis_that_accepts_but_never_answers_fails_within_the_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {"IMGQ_REDIS_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0", "IMGQ_REDIS_TIMEOUT": "2"}
        start = time.monotonic()
        line = one_line(imgq("status", JOB, env=env))
        took = time.monotonic() - start
    assert "cannot reach Redis" in line and "IMGQ_REDIS_TIMEOUT=2 s" in line
    print(f"silent Redis: failed in {took:.1f} s")
    assert took < 60


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        redis.Redis(port=server.port).config_set("requirepass", "s3cret")
        yield server


@pytest.mark.parametrize("args", [*CLIENT_COMMANDS[:5], ["retrain"]], ids=" ".join)
def test_a_wrong_or_missing_password_is_one_line(args: list[str], password_redis: RedisServer,
                                                 tmp_path: Path) -> None:
    url_file = tmp_path / "urls.txt"
    url_file.write_text("http://127.0.0.1/a.jpg\n")
    argv = [str(url_file) if a == "URLS" else a for a in args]
    wrong = imgq(*argv, env={"IMGQ_REDIS_URL": f"redis://:wrong@127.0.0.1:{password_redis.port}/0"})
    line = one_line(wrong)
    assert f"Redis at redis://:***@127.0.0.1:{password_redis.port}/0 refused the credentials" in line, line
    assert ":wrong@" not in wrong.stderr
    none = imgq(*argv, env={"IMGQ_REDIS_URL": password_redis.url}, timeout=60)  # used to hang
    assert "asks for a password and IMGQ_REDIS_URL gives none" in one_line(none)


# -- stdout is data ----------------------------------------------------------------------------------------

def test_a_reader_that_closes_the_pipe_early_ends_silently_with_141(redis_env: dict[str, str],
                                                                    done_job: tuple[str, Path]) -> None:
    job, _ = done_job
    env = {**os.environ, **TEST_ENV, **redis_env}
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m cli results {job} | head -1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.PIPE_CLOSED, proc.stderr  # what `cat big | head -1` gives
    assert proc.stderr == "" and proc.stdout.count("\n") == 1 and '"invalid_url"' in proc.stdout


def test_submit_prints_only_the_job_id_and_with_wait_only_the_results(redis_env: dict[str, str]) -> None:
    proc = imgq("submit", "-", env=redis_env, stdin=answered_at_submit(5))
    assert proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}\n", proc.stdout), proc.stdout
    waited = imgq("submit", "-", "--wait", env=redis_env, stdin=answered_at_submit(5))
    assert waited.returncode == 0, waited.stderr
    assert [line.count('"index"') for line in waited.stdout.splitlines()] == [1] * 5  # results only
    (job_line,) = waited.stderr.splitlines()  # no progress off a terminal unless asked
    assert re.fullmatch(r"imgq: job [0-9a-f]{32}", job_line)
    summary = imgq("results", job_line.split()[-1], "--summary", "--json", env=redis_env)
    assert summary.stdout.strip() == ('{"results": 5, "missing": 0, "labelled": 0, "errors": {"invalid_url": 5}, '
                                      '"labels": {}}')


def test_version() -> None:
    proc = imgq("--version", env={})
    assert proc.returncode == 0 and re.fullmatch(r"imgq \S+\n", proc.stdout)


# -- client commands never import torch ---------------------------------------------------------------------

def test_client_commands_never_import_torch(redis_env: dict[str, str], done_job: tuple[str, Path],
                                            tmp_path: Path, cluster: Cluster, image_site: ImageSite) -> None:
    job, url_file = done_job
    # A job with labelled images, so `imgq report` fetches and decodes thumbnails (the session worker's Redis).
    labelled = cluster.submit(list(image_site.truth)[:4])
    assert cluster.wait(labelled).failed == 0
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "torch-imports.log"
    (site / "sitecustomize.py").write_text(
        "import os, sys, traceback\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            with open(os.environ['TORCH_LOG'], 'a') as f:\n"
        "                f.write(' '.join(sys.argv) + ': ' + name + '\\n' + ''.join(traceback.format_stack()))\n"
        "            raise ImportError(name + ' imported by a client command')\n"
        "        return None\n"
        "sys.meta_path.insert(0, NoTorch())\n")
    env = {**redis_env, "TORCH_LOG": str(log),
           "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for args in (["submit", str(url_file)], ["submit", str(url_file), "--wait", "-o", str(tmp_path / "r.jsonl")],
                 ["status"], ["status", "--json"], ["status", job], ["results", job], ["results", job, "--summary"],
                 ["reconcile", job, str(url_file)], ["report", job, "-o", str(tmp_path / "r.html")],
                 ["report", labelled, "-o", str(tmp_path / "thumbs.html")]):
        proc = imgq(*args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (tmp_path / "thumbs.html").read_text().count('src="data:image/jpeg;base64,') == 4
    # Flower loads the worker's Celery app and imports its tasks module (the app's include).
    flower_port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "flower", "--address=127.0.0.1",
                               f"--port={flower_port}"], env={**os.environ, **TEST_ENV, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{flower_port}/healthcheck") or flower.poll() is not None,
                   120, "Flower to answer", poll_s=0.2)
        assert flower.poll() is None, f"flower exited {flower.returncode}"
    finally:
        flower.terminate()
        flower.wait(60)
    assert not log.exists(), log.read_text()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:  # not listening yet (URLError and connection errors are OSErrors)
        return False


# -- long waits: retrain without a trainer, a worker on a queue nobody sends to --------------------------------

def test_retrain_wait_without_a_trainer_says_how_to_start_one(tmp_path: Path) -> None:
    with RedisServer() as server:  # its own Redis: no trainer of another test can be consuming
        start = time.monotonic()
        proc = imgq("retrain", "--wait", env={"IMGQ_REDIS_URL": server.url, "IMGQ_MODEL_DIR": str(tmp_path)},
                    timeout=300)
        took = time.monotonic() - start
    line = one_line(proc)
    assert "no trainer is consuming queue imgq.train" in line
    assert "imgq worker --queues imgq.train --concurrency 1" in line
    print(f"retrain --wait without a trainer: gave up after {took:.1f} s")


def test_a_worker_on_a_queue_nobody_sends_to_warns_naming_the_real_ones(redis_server: RedisServer,
                                                                        tmp_path: Path) -> None:
    env = {**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": redis_server.url, "IMGQ_MODEL_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--queues", "train"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = _line_within(proc.stderr, 60)
    finally:
        proc.terminate()
        proc.wait(60)
    assert first.startswith("imgq worker: warning: nobody sends to queue train:"), first
    assert "imgq.classify (IMGQ_CLASSIFY_QUEUE)" in first and "imgq.train (IMGQ_TRAIN_QUEUE)" in first


def _line_within(stream: object, timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()  # type: ignore[attr-defined]
    return lines.get(timeout=timeout_s)


# -- Ctrl-C keeps what is done --------------------------------------------------------------------------------

class Lines:
    """Everything a process writes on a pipe, split on newlines and carriage returns, read in a thread."""

    def __init__(self, stream: object) -> None:
        self.text = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):  # type: ignore[attr-defined]
            with self._lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                for line in reversed(re.split(r"[\r\n]", self.text)):
                    if found := re.search(pattern, line):
                        return found
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout_s} s in:\n{self.text[-3000:]}")


def test_ctrl_c_on_run_keeps_the_finished_results_and_says_how_to_finish(
        model_dir: Path, image_site: ImageSite, tmp_path: Path) -> None:
    fast = list(image_site.truth)[:16]
    with HTTPTestServer() as slow_site:
        slow_site.add_handler("/slow.jpg", trickle(interval_s=1.0))  # each ends `timeout` after 3 s
        # 60 batches of 4 slow URLs behind the fast ones: ~45 s of work left when Ctrl-C comes
        urls = fast + [slow_site.url(f"/slow.jpg?i={i}") for i in range(240)]
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        out = tmp_path / "results.jsonl"
        env = {**os.environ, **TEST_ENV, "IMGQ_MODEL_DIR": str(model_dir)}
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(url_file), "-o", str(out), "--progress",
                                 "--batch-size", "4"], env=env, stderr=subprocess.PIPE)
        try:
            stderr = Lines(proc.stderr)
            # The progress line: done/total, failed, a rate, an ETA. Wait until the fast part is done.
            seen = stderr.wait_for(r"^(\d+)/256 done, (\d+) failed, [\d.]+ img/s, ETA [\d:?]+, running$", 240)
            while int(seen[1]) < len(fast):
                seen = stderr.wait_for(r"^(\d+)/256 done, (\d+) failed, [\d.]+ img/s, ETA [\d:?]+, running$", 240)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(120) == ExitCode.INTERRUPTED
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    last = stderr.text.strip().splitlines()[-1]
    found = re.fullmatch(r"imgq: interrupted: job (\w{32}): wrote the (\d+) of 256 results that were done to "
                         r"(\S+); the other (\d+) URLs are in (\S+): finish them with `imgq run \5 -o REST.jsonl`",
                         last)
    assert found, stderr.text[-2000:]
    written, rest = int(found[2]), int(found[4])
    assert found[3] == str(out) and written >= len(fast) and written + rest == 256
    records = read_jsonl(out)
    assert len(records) == written and [r["url"] for r in records][: len(fast)] == fast
    assert all(r["label"] == image_site.truth[r["url"]] for r in records[: len(fast)])  # type: ignore[index]
    remaining = Path(found[5]).read_text().splitlines()
    assert sorted(remaining + [str(r["url"]) for r in records]) == sorted(urls)
    assert "Traceback" not in stderr.text


def test_ctrl_c_on_submit_names_the_job_and_what_was_accepted(redis_server: RedisServer, tmp_path: Path) -> None:
    url_file = tmp_path / "urls.txt"
    url_file.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(100)))
    queue_name = f"imgq.classify.{os.getpid()}"  # its own queue, nobody consumes it: submit waits for room
    env = {**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": redis_server.url, "IMGQ_MAX_QUEUE_DEPTH": "1",
           "IMGQ_CLASSIFY_QUEUE": queue_name}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "submit", str(url_file), "--batch-size", "10"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stderr = Lines(proc.stderr)
        stderr.wait_for(r"IMGQ_MAX_QUEUE_DEPTH=1\); waiting for workers", 120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == ExitCode.INTERRUPTED
        assert proc.stdout is not None
        job = proc.stdout.read().decode().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = stderr.text.strip().splitlines()[-1]
    assert last == (f"imgq: interrupted: job {job} accepted the first 10 URLs, which will be classified; "
                    f"enqueue the rest with `imgq reconcile {job} {url_file}`"), stderr.text
    status = imgq("status", job, "--json", env={"IMGQ_REDIS_URL": redis_server.url})
    assert '"total": 10' in status.stdout and '"state": "submitting"' in status.stdout
    redis.Redis.from_url(redis_server.url).delete(queue_name)
