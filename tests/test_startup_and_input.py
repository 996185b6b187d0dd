"""Issue 12, classes 2, 9 and 10, through real `imgq` processes and a real redis-server.

- A worker that cannot serve (no CUDA for ``--device cuda`` or a ``--gpus`` child, a corrupt champion, a
  champion pointer naming a version that is not there) exits at start-up with one line and code 3, before
  it consumes anything; the supervisor does not restart such a child.
- Redis at maxmemory for a few seconds mid-job: kombu's acknowledgement is refused and Celery stops; the
  worker exits non-zero (never 0 unless asked to stop), the supervisor restarts it with back-off, and the
  job completes with every index exactly once.
- URL files: a UTF-8 byte-order mark is dropped; a line that is not valid UTF-8 ends ``invalid_url`` naming
  its line, counted once in the job, and nothing is fetched for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
import torch

from imgq import keys
from imgq.jobs import JobStore
from imgq.local import WorkerProcess
from imgq.redis_server import RedisServer
from imgq.settings import Settings
from producer.reconcile import find_missing
from producer.sources import UndecodableLine, read_urls
from producer.submit import submit_urls
from tests.httpserver import HTTPTestServer
from tests.support import TEST_ENV, ImageSite, closed_port_url, one_image_site, read_jsonl, settings_for
from worker.app import create_app
from worker.urlcheck import validate_url

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")


def _env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": redis_url, "IMGQ_MODEL_DIR": str(model_dir),
            "PYTHONUNBUFFERED": "1", **extra}


def _imgq_worker(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "worker", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _own_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("imgq worker:")]


class _Queued:
    """A private Redis holding one job whose one batch waits in the classify queue."""

    def __init__(self, server: RedisServer, model_dir: Path) -> None:
        self.settings = settings_for(server.url, model_dir)
        self.store = JobStore.from_url(server.url, ttl_s=self.settings.job_ttl_s)
        app = create_app(self.settings)
        try:
            self.job = submit_urls([closed_port_url(), closed_port_url()], settings=self.settings, store=self.store,
                                   app=app)
        finally:
            app.close()
        assert self.depth() == 1

    def depth(self) -> int:
        return self.store.queue_depth(self.settings.classify_queue)

    def assert_untouched(self) -> None:
        """Nothing consumed: the batch is still queued, not unacked, and has no result."""
        assert self.depth() == 1
        assert self.store.r.hlen("unacked") == 0
        assert self.store.status(self.job).done == 0


@pytest.fixture
def queued(model_dir: Path) -> Iterator[_Queued]:
    with RedisServer() as server:
        q = _Queued(server, model_dir)
        yield q
        q.store.r.close()


# -- class 2: a worker that cannot serve never takes a batch ------------------------------------------------


@NO_CUDA
def test_worker_asked_for_cuda_on_a_host_without_it_refuses_before_consuming(queued: _Queued,
                                                                              model_dir: Path) -> None:
    proc = _imgq_worker("--device", "cuda", env=_env(queued.settings.redis_url, model_dir))
    assert proc.returncode == 3, proc.stderr
    (line,) = _own_lines(proc.stderr)
    assert "cannot serve" in line and "IMGQ_DEVICE=cuda" in line and "cpu" in line, line
    assert "Traceback" not in proc.stderr and "ready" not in proc.stderr
    queued.assert_untouched()


def _corrupt_weights(model_dir: Path, tmp_path: Path, queued: _Queued) -> tuple[Path, str]:
    bad = tmp_path / "models"
    shutil.copytree(model_dir, bad)
    (weights,) = bad.glob("versions/*/weights.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    return bad, "not a valid safetensors file"


def _pointer_to_nothing(model_dir: Path, tmp_path: Path, queued: _Queued) -> tuple[Path, str]:
    queued.store.r.set(keys.CHAMPION, "20990101T000000Z-deadbeef")  # Redis's pointer wins over the disk's
    return model_dir, "20990101T000000Z-deadbeef"


@pytest.mark.parametrize("break_model", [_corrupt_weights, _pointer_to_nothing])
def test_worker_with_a_champion_it_cannot_load_refuses_before_consuming(
        break_model: Callable[[Path, Path, _Queued], tuple[Path, str]], queued: _Queued, model_dir: Path,
        tmp_path: Path) -> None:
    models, needle = break_model(model_dir, tmp_path, queued)
    proc = _imgq_worker(env=_env(queued.settings.redis_url, models))
    assert proc.returncode == 3, proc.stderr
    (line,) = _own_lines(proc.stderr)
    assert "cannot serve" in line and needle in line and "imgq models" in line, line
    assert "Traceback" not in proc.stderr
    queued.assert_untouched()


@NO_CUDA
def test_a_gpus_child_on_a_host_without_cuda_refuses_and_is_not_restarted(queued: _Queued,
                                                                           model_dir: Path) -> None:
    proc = _imgq_worker("--gpus", "0", env=_env(queued.settings.redis_url, model_dir))
    assert proc.returncode == 3, proc.stderr
    lines = _own_lines(proc.stderr)
    refusals = [line for line in lines if "cannot serve" in line]
    assert len(refusals) == 1 and "IMGQ_DEVICE=cuda" in refusals[0] and "--processes" in refusals[0], lines
    assert sum("started gpu0@" in line for line in lines) == 1
    assert any("gpu0@%h refused to start (exit 3" in line for line in lines), lines
    assert not any("restart" in line.split("refused to start")[0] for line in lines), lines
    assert "Traceback" not in proc.stderr
    queued.assert_untouched()


# -- class 9: Redis out of memory while workers consume -----------------------------------------------------


@pytest.mark.parametrize(("code", "restarts", "result"), [(1, 5, 1), (0, 5, 1), (137, 5, 137), (3, 0, 3)])
def test_the_supervisor_restarts_a_child_that_stops_on_its_own_with_bounded_back_off(
        code: int, restarts: int, result: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """Children that die at once (a sitecustomize exits with ``code``): restarted with back-off, at most
    MAX_RESTARTS times in the window, then given up; a start-up refusal (3) is never restarted."""
    from worker import supervisor

    monkeypatch.setattr(supervisor, "BACKOFF_S", 0.01)
    monkeypatch.setattr(supervisor, "BACKOFF_MAX_S", 0.05)
    (tmp_path / "sitecustomize.py").write_text(f"import os\nos._exit({code})\n")
    child = supervisor.Child("cpu0@%h", {"PYTHONPATH": str(tmp_path), "IMGQ_METRICS_PORT": "0"})
    assert supervisor.supervise([child], Settings.from_env(TEST_ENV)) == result
    err = capsys.readouterr().err
    assert err.count("restarted cpu0@%h") == restarts, err
    assert ("giving up" in err) == (code != 3) and ("refused to start" in err) == (code == 3), err
    if restarts:
        delays = [float(d) for d in re.findall(r"restarting it in ([\d.]+) s", err)]
        assert delays == sorted(delays) and delays[0] == 0.01 and delays[-1] == 0.05  # doubling, capped


class _Supervisor:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        children = psutil.Process(self.proc.pid).children()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=90)
        psutil.wait_procs(children, timeout=10)
        return code


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, *, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def _oom_refusals(admin: redis.Redis) -> int:
    stats = admin.info("errorstats")
    return int(stats.get("errorstat_OOM", {}).get("count", 0))


@pytest.fixture(scope="module")
def slow_site(image_site: ImageSite) -> Iterator[tuple[HTTPTestServer, str]]:
    """/slow.jpg after 0.3 s a response, so a job is still running when Redis fills."""
    with one_image_site(image_site, slow_s=0.3, slow_path="/slow.jpg", content_type="application/octet-stream") as s:
        yield s


@pytest.mark.slow
def test_redis_out_of_memory_mid_job_workers_restart_and_the_job_completes(
        model_dir: Path, slow_site: tuple[HTTPTestServer, str], tmp_path: Path) -> None:
    server, label = slow_site
    with RedisServer(config={"maxmemory-policy": "noeviction"}) as rs:
        settings = settings_for(rs.url, model_dir)
        admin = redis.Redis.from_url(rs.url)
        app = create_app(settings)
        store = JobStore.from_url(rs.url, ttl_s=settings.job_ttl_s)
        env = _env(rs.url, model_dir)
        env.pop("IMGQ_TORCH_THREADS")  # --processes picks it per child
        sup = _Supervisor(["--processes", "1"], env, tmp_path / "supervisor.log")
        plain = WorkerProcess(settings, name="plain@%h", log_dir=tmp_path)  # the single `imgq worker`
        try:
            _wait_until(lambda: len(app.control.ping(timeout=0.5)) >= 2, 120, "two workers ready", poll_s=0)
            n = 480
            job = submit_urls([server.url(f"/slow.jpg?i={i}") for i in range(n)], settings=settings, store=store,
                              app=app)
            results = keys.results(job)
            _wait_until(lambda: admin.hlen(results) >= 16, 60, "the job under way")
            # Full for sure: a limit just above the memory in use stops being full as soon as workers drain the
            # queue, and on a loaded machine the job could then finish before any write was refused.
            admin.config_set("maxmemory", 1)
            _wait_until(lambda: _oom_refusals(admin) > 0, 30, "Redis refusing writes")
            assert admin.hlen(results) < n, "the job finished before Redis was full"
            time.sleep(3)  # the fault's duration, not a synchronisation: Redis stays full a few seconds
            admin.config_set("maxmemory", 0)
            print(f"\n[oom] {_oom_refusals(admin)} commands refused; {admin.hlen(results)}/{n} results when room "
                  "came back")

            # HLEN is never refused, unlike the MULTI pipeline of JobStore.status: poll with it.
            _wait_until(lambda: admin.hlen(results) >= n, 120, "every result", poll_s=0.5)
            status = store.status(job)
            assert (status.total, status.done, status.state) == (n, n, "done"), status
            records = [r for r in store.iter_results(job, n) if r is not None]
            assert [r["index"] for r in records] == list(range(n))
            assert {r["label"] for r in records} == {label}, [r["error"] for r in records if r["error"]][:3]

            log = sup.text()
            exits = [int(code) for code in re.findall(r"cpu0@%h exited with code (-?\d+)", log)]
            assert 0 not in exits, log[-3000:]
            assert log.count("restarted cpu0@%h") == len(exits), log[-3000:]
            assert sup.proc.poll() is None, log[-3000:]
            plain_code = plain.proc.poll()
            assert plain_code != 0, plain.log_tail()
            if plain_code is not None:
                assert "stopped without being asked to" in plain.log_tail(40), plain.log_tail(40)
            print(f"[oom] supervised child exits {exits}, restarts {log.count('restarted cpu0@%h')}; "
                  f"plain worker exit code {plain_code}")
            assert sup.stop() == 0
        finally:
            plain.stop()
            if sup.proc.poll() is None:
                sup.proc.kill()
            app.close()
            store.r.close()
            admin.close()


# -- class 10: URL files that are not clean UTF-8 -----------------------------------------------------------

_LINE = re.compile(r"line (\d+) is not valid UTF-8 \(byte 0x([0-9a-f]{2}) at offset (\d+)\); the URL was not fetched")


def test_read_urls_drops_byte_order_marks_and_flags_undecodable_lines_also_on_stdin(tmp_path: Path) -> None:
    data = (b"\xef\xbb\xbfhttp://a/1.jpg\r\n# comment \xff\n\nhttp://a/\xff2.jpg\rhttp://a/3.jpg\n"
            b"\xef\xbb\xbfhttp://a/4.jpg\n")
    f = tmp_path / "urls.txt"
    f.write_bytes(data)
    urls = list(read_urls(f))
    assert urls == ["http://a/1.jpg", "http://a/\ufffd2.jpg", "http://a/3.jpg", "http://a/4.jpg"]
    assert [type(u) for u in urls] == [str, UndecodableLine, str, str]
    bad = urls[1]
    assert isinstance(bad, UndecodableLine)
    assert bad.reason == "line 4 is not valid UTF-8 (byte 0xff at offset 9); the URL was not fetched"
    script = ("import json; from producer.sources import read_urls; "
              "print(json.dumps([[u, getattr(u, 'reason', None)] for u in read_urls('-')]))")
    proc = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[u, getattr(u, "reason", None)] for u in urls]


def test_worker_refuses_urls_holding_a_replacement_or_control_character() -> None:
    from imgq.errors import ErrorCode, ItemError

    for url in ("http://example.com/a\ufffd.jpg", "http://exa\ufffdmple.com/a.jpg", "http://example.com/a\x7f.jpg"):
        with pytest.raises(ItemError) as err:
            validate_url(url)
        assert err.value.code is ErrorCode.INVALID_URL


def test_an_undecodable_line_is_answered_at_submit_and_reconcile_still_matches_the_file(
        model_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "urls.txt"
    f.write_bytes(b"\xef\xbb\xbfhttp://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/\xc3(b.jpg\nhttp://127.0.0.1:9/c.jpg\n")
    with RedisServer() as server:
        settings: Settings = settings_for(server.url, model_dir, IMGQ_BATCH_SIZE="2")
        store = JobStore.from_url(server.url, ttl_s=settings.job_ttl_s)
        app = create_app(settings)
        try:
            job = submit_urls(read_urls(f), settings=settings, store=store, app=app)
            status = store.status(job)
            assert (status.total, status.done, status.failed) == (3, 1, 1)  # counted like any item
            (record,) = [r for r in store.iter_results(job, 3) if r is not None]
            assert record["index"] == 1 and record["url"] == "http://127.0.0.1:9/\ufffd(b.jpg"
            assert record["error"] == {"code": "invalid_url", "message": "line 2 is not valid UTF-8 (byte 0xc3 at "
                                       "offset 19); the URL was not fetched"}
            # Only the decodable URLs were sent to workers, in the job's two batches.
            sent = [json.loads(m) for m in store.r.lrange(settings.classify_queue, 0, -1)]
            assert len(sent) == 2
            # Reconcile reads the file the same way: the recorded URL matches its line.
            count, missing = find_missing(store, status, read_urls(f))
            assert (count, [i for i, _ in missing]) == (3, [0, 2])
        finally:
            app.close()
            store.r.close()


def test_imgq_run_on_a_file_with_a_bom_and_a_line_of_invalid_utf8(
        model_dir: Path, image_site: ImageSite, tmp_path: Path) -> None:
    (url_a, label_a), (url_b, label_b) = list(image_site.truth.items())[:2]
    with HTTPTestServer() as server:
        for path, url in (("/a.jpg", url_a), ("/caf\u00e9.jpg", url_b)):
            server.add(path, body=(image_site.root / url.removeprefix(image_site.base + "/")).read_bytes(),
                       content_type="application/octet-stream")
        base = server.url("").rstrip("/").encode()
        # Line 4 is "/café.jpg" written in Latin-1: replacing its bad byte would fetch "/caf\ufffd.jpg" instead.
        lines = [b"\xef\xbb\xbf" + base + b"/a.jpg", b"# a comment", base + "/caf\u00e9.jpg".encode(),
                 base + b"/caf\xe9.jpg", b"", base + b"/a.jpg?again"]
        url_file = tmp_path / "urls.txt"
        url_file.write_bytes(b"\r\n".join(lines) + b"\r\n")
        out = tmp_path / "results.jsonl"
        env = {**os.environ, **TEST_ENV, "IMGQ_MODEL_DIR": str(model_dir)}
        proc = subprocess.run([sys.executable, "-m", "cli", "run", str(url_file), "-o", str(out), "-q"],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        # Nothing but the two real images was asked for: no request for a mangled URL reached the server.
        assert dict(server.hits) == {"/a.jpg": 2, "/caf\u00e9.jpg": 1}
    records = read_jsonl(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert records[0]["url"] == base.decode() + "/a.jpg" and records[0]["label"] == label_a  # BOM dropped
    assert records[1]["label"] == label_b
    bad = records[2]
    assert bad["url"] == base.decode() + "/caf\ufffd.jpg" and bad["label"] is None
    found = _LINE.fullmatch(str(bad["error"]["message"]))  # type: ignore[index]
    assert bad["error"]["code"] == "invalid_url" and found, bad  # type: ignore[index]
    assert (found[1], found[2], int(found[3])) == ("4", "e9", len(base) + 4), bad
    assert records[3]["label"] == label_a
    assert "4 URLs, 3 labelled, 1 errors (invalid_url=1)" in proc.stderr
