"""Jobs from tables (issue 16): CSV, TSV, JSONL and Parquet inputs, kept columns in every record, and resume.

Everything goes through the `imgq` command as a subprocess, with real workers, a real Redis and images over
HTTP on 127.0.0.1: `imgq run` (its own private Redis and worker) and `imgq submit` (the session's cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from imgq import keys
from imgq.errors import ExitCode
from tests.httpserver import HTTPTestServer
from tests.support import TEST_ENV, Cluster, ImageSite, read_jsonl, wait_until
from tests.test_cli_errors import Lines

# An id a spreadsheet would mangle if it were read as a number: the CSV's text must come back as it is.
ID = "id-{:03d}"


def imgq(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def write_table(path: Path, rows: list[dict[str, object]], url_column: str = "url") -> Path:
    """``rows`` (dicts with ``id`` and the URL column; None for an empty cell) as the format ``path`` names."""
    columns = list(rows[0])
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups and batches
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        lines = [sep.join(columns)] + [sep.join("" if r[c] is None else str(r[c]) for c in columns) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def by_id(records: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    """Records by their kept id, after checking that every id appears exactly once."""
    counts = Counter(r["id"] for r in records)
    assert not [i for i, n in counts.items() if n != 1], counts
    return {r["id"]: r for r in records}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_run_a_table_keeps_the_id_column_in_every_record(suffix: str, model_dir: Path, image_site: ImageSite,
                                                         tmp_path: Path) -> None:
    urls = list(image_site.truth)[:12]
    rows: list[dict[str, object]] = [{"id": ID.format(i), "url": u} for i, u in enumerate(urls)]
    rows.insert(5, {"id": "no-url", "url": None})  # an empty cell (CSV), a null (Parquet, JSONL)
    if suffix == ".parquet":
        for i, row in enumerate(rows):
            row["taken"] = pa.scalar(1_700_000_000_000_000 + i, pa.timestamp("us", tz="UTC")).as_py()
    table = write_table(tmp_path / f"in{suffix}", rows)
    out = tmp_path / "out.jsonl"
    keep = "id,taken" if suffix == ".parquet" else "id"
    proc = imgq("run", str(table), "--keep", keep, "-o", str(out), "--batch-size", "4", "-q",
                env={**TEST_ENV, "IMGQ_MODEL_DIR": str(model_dir)})
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out)
    assert [r["index"] for r in records] == list(range(len(rows)))  # every row, in input order
    got = by_id(records)
    assert set(got) == {r["id"] for r in rows}
    for i, url in enumerate(urls):
        record = got[ID.format(i)]
        assert (record["url"], record["label"], record["error"]) == (url, image_site.truth[url], None)
    blank = got["no-url"]
    assert blank["index"] == 5 and blank["label"] is None
    assert blank["error"]["code"] == "invalid_url"  # type: ignore[index]
    assert "row 6" in blank["error"]["message"] or "line 6" in blank["error"]["message"]  # type: ignore[index]
    if suffix == ".parquet":
        assert got[ID.format(0)]["taken"] == "2023-11-14T22:13:20.000000+0000"  # a timestamp, as ISO 8601 text


def test_kept_columns_that_clash_or_are_missing_are_one_line_errors(cluster: Cluster, tmp_path: Path) -> None:
    env = {**TEST_ENV, "IMGQ_REDIS_URL": cluster.settings.redis_url}
    table = write_table(tmp_path / "in.csv", [{"id": "a", "url": "http://127.0.0.1:9/a.jpg", "label": "x"}])
    before = cluster.store.recent_jobs(1000)

    for cmd in ("run", "submit"):
        clash = imgq(cmd, str(table), "--keep", "id,label", env=env)
        assert clash.returncode == ExitCode.USAGE
        line = one_error_line(clash)
        assert "'label' is a field of the result record itself" in line and "index, url, label" in line, line

    missing_url = imgq("submit", str(table), "--url-column", "image", env=env)
    assert missing_url.returncode == ExitCode.FAILED and missing_url.stdout == ""
    assert one_error_line(missing_url) == (f"imgq: {table} has no column 'image' (its columns: id, url, label); "
                                           "name the URL column with --url-column")
    missing_keep = imgq("submit", str(table), "--keep", "id,source", env=env)
    assert missing_keep.returncode == ExitCode.FAILED and missing_keep.stdout == ""
    assert "has no column 'source' to keep" in one_error_line(missing_keep)

    url_list = tmp_path / "urls.txt"
    url_list.write_text("http://127.0.0.1:9/a.jpg\n")
    not_a_table = imgq("submit", str(url_list), "--keep", "id", env=env)
    assert not_a_table.returncode == ExitCode.USAGE
    assert "--keep needs a table" in one_error_line(not_a_table)
    assert cluster.store.recent_jobs(1000) == before  # none of them created a job


def test_reconcile_a_lost_table_job_restores_every_id_once(cluster: Cluster, image_site: ImageSite,
                                                           tmp_path: Path) -> None:
    env = {**TEST_ENV, "IMGQ_REDIS_URL": cluster.settings.redis_url}
    urls = list(image_site.truth)[:10]
    table = write_table(tmp_path / "in.tsv", [{"id": ID.format(i), "url": u} for i, u in enumerate(urls)])
    proc = imgq("submit", str(table), "--keep", "id", "--wait", "-o", str(tmp_path / "first.jsonl"), "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    # Redis lost the job record (as when it expires) and half of the results.
    r = cluster.store.r
    r.delete(keys.job(job))
    r.hdel(keys.results(job), *[str(i) for i in range(0, 10, 2)])

    # The same input without the kept column is not what the job was submitted from.
    wrong = imgq("reconcile", job, str(table), env=env)
    assert wrong.returncode == ExitCode.FAILED
    assert f"job {job} was submitted with --keep id, not no --keep" in one_error_line(wrong)

    fixed = imgq("reconcile", job, str(table), "--keep", "id", env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == (f"job {job}: job record was lost: recreated from {table} with 10 URLs; "
                                    "5 of 10 URLs had no result; enqueued in 1 batches")
    cluster.wait(job)
    out = tmp_path / "out.parquet"  # the kept column is a column of the Parquet output too
    results = imgq("results", job, "-o", str(out), env=env)
    assert results.returncode == 0, results.stderr
    got = by_id(pq.read_table(out).to_pylist())
    assert {i: (r["url"], r["label"]) for i, r in got.items()} == {
        ID.format(i): (u, image_site.truth[u]) for i, u in enumerate(urls)}


@pytest.fixture
def gated_site(image_site: ImageSite) -> Iterator[tuple[HTTPTestServer, threading.Event, str]]:
    """One demo image under /fast.png at once, and under /gated.png only once the event is set (bounded)."""
    url, label = next(iter(image_site.truth.items()))
    body = (image_site.root / url.removeprefix(image_site.base + "/")).read_bytes()
    gate = threading.Event()

    async def gated(request: web.BaseRequest) -> web.StreamResponse:
        for _ in range(1200):  # at most 60 s
            if gate.is_set():
                break
            await asyncio.sleep(0.05)
        return web.Response(body=body, content_type="image/png")

    with HTTPTestServer() as server:
        server.add("/fast.png", body=body, content_type="image/png")
        server.add_handler("/gated.png", gated)
        yield server, gate, label
    gate.set()


# Fetches that wait for the gate must not time out: they stay unfinished until Ctrl-C.
SLOW_OK = {"IMGQ_FETCH_TIMEOUT": "30", "IMGQ_TASK_TIME_LIMIT": "60", "IMGQ_VISIBILITY_TIMEOUT": "120"}
PROGRESS = r"^(\d+)/{n} done, (\d+) failed, [\d.]+ img/s, ETA [\d:?]+, (running|submitting)$"


def test_ctrl_c_on_run_of_a_table_then_run_the_rest_every_id_once(
        model_dir: Path, gated_site: tuple[HTTPTestServer, threading.Event, str], tmp_path: Path) -> None:
    server, gate, label = gated_site
    # 11 fast rows and one without a URL fill the first three batches of 4 (a batch writes its results at once).
    fast = [server.url(f"/fast.png?i={i}") for i in range(11)]
    gated = [server.url(f"/gated.png?i={i}") for i in range(20)]
    rows: list[dict[str, object]] = [{"id": ID.format(i), "image": u} for i, u in enumerate([*fast, *gated])]
    rows.insert(3, {"id": "no-url", "image": None})
    table = write_table(tmp_path / "in.csv", rows)
    out, rest = tmp_path / "out.jsonl", tmp_path / "rest.jsonl"
    env = {**os.environ, **TEST_ENV, **SLOW_OK, "IMGQ_MODEL_DIR": str(model_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(table), "--url-column", "image", "--keep", "id",
                             "-o", str(out), "--progress", "--batch-size", "4"], env=env, stderr=subprocess.PIPE)
    try:
        stderr = Lines(proc.stderr)
        pattern = PROGRESS.format(n=len(rows))
        seen = stderr.wait_for(pattern, 240)
        while int(seen[1]) < len(fast) + 1:  # the fast rows and the row without a URL
            seen = stderr.wait_for(pattern, 240)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == ExitCode.INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = stderr.text.strip().splitlines()[-1]
    found = re.fullmatch(rf"imgq: interrupted: job \w{{32}}: wrote the (\d+) of {len(rows)} results that were done to "
                         r"\S+; the other (\d+) URLs are in (\S+): finish them with "
                         r"`imgq run (\S+) --url-column image --keep id -o REST.jsonl`", last)
    assert found, stderr.text[-2000:]
    assert found[3] == found[4] == str(tmp_path / "out.remaining.jsonl")
    assert int(found[1]) == len(read_jsonl(out)) >= len(fast) + 1
    assert int(found[1]) + int(found[2]) == len(rows)
    remaining = read_jsonl(Path(found[3]))
    assert len(remaining) == int(found[2]) > 0 and all(set(r) == {"image", "id"} for r in remaining)

    gate.set()
    again = imgq("run", found[3], "--url-column", "image", "--keep", "id", "-o", str(rest), "-q", env=env)
    assert again.returncode == 0, again.stderr
    got = by_id(read_jsonl(out) + read_jsonl(rest))  # every id exactly once across the two outputs
    assert set(got) == {r["id"] for r in rows}
    for row in rows:
        record = got[row["id"]]
        assert record["url"] == (row["image"] or "")
        if row["image"] is None:
            assert record["error"]["code"] == "invalid_url"  # type: ignore[index]
        else:
            assert (record["label"], record["error"]) == (label, None), record


def test_ctrl_c_on_submit_of_a_table_then_resume_finishes_exactly_the_rest(
        make_cluster: Callable[..., Cluster], gated_site: tuple[HTTPTestServer, threading.Event, str],
        tmp_path: Path) -> None:
    server, gate, label = gated_site
    cluster = make_cluster(**SLOW_OK)
    cluster.start_worker()
    cluster.wait_ready()
    fast = [server.url(f"/fast.png?j={i}") for i in range(8)]
    gated = [server.url(f"/gated.png?j={i}") for i in range(40)]
    rows: list[dict[str, object]] = [{"id": ID.format(i), "url": u} for i, u in enumerate([*fast, *gated])]
    table = write_table(tmp_path / "in.parquet", rows)
    # One batch queued at a time: the submission moves only as fast as the worker, which stalls on the gated
    # rows, so it is still submitting once the fast rows have their results.
    env = {**TEST_ENV, **SLOW_OK, "IMGQ_REDIS_URL": cluster.settings.redis_url, "IMGQ_MAX_QUEUE_DEPTH": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "submit", str(table), "--keep", "id", "--batch-size", "2",
                             "--wait", "-o", str(tmp_path / "never.jsonl")], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stderr = Lines(proc.stderr)
        wait_until(lambda: _done(cluster) >= len(fast), 240,
                   lambda: f"the fast rows' results:\n{stderr.text[-2000:]}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == ExitCode.INTERRUPTED
        assert proc.stdout is not None
        job = proc.stdout.read().decode().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = stderr.text.strip().splitlines()[-1]
    found = re.fullmatch(rf"imgq: interrupted: job {job} accepted the first (\d+) URLs, which will be classified; "
                         rf"enqueue the rest with `imgq reconcile {job} {table} --keep id`", last)
    assert found, stderr.text[-2000:]
    accepted = int(found[1])
    assert len(fast) <= accepted < len(rows)
    assert cluster.store.status(job).state == "submitting"

    gate.set()
    out = tmp_path / "out.jsonl"
    resumed = imgq("submit", "--resume", job, str(table), "--keep", "id", "--wait", "-o", str(out), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == job
    note = re.search(rf"imgq: job {job}: (\d+) of {len(rows)} URLs had no result \((\d+) of them never submitted "
                     r"before\); enqueued again in \d+ batches", resumed.stderr)
    assert note and int(note[2]) == len(rows) - accepted, resumed.stderr
    status = cluster.store.status(job)
    assert (status.total, status.done, status.state) == (len(rows), len(rows), "done")
    records = read_jsonl(out)
    assert [r["index"] for r in records] == list(range(len(rows)))
    got = by_id(records)
    assert {i: (r["url"], r["label"]) for i, r in got.items()} == {row["id"]: (row["url"], label) for row in rows}


def _done(cluster: Cluster) -> int:
    """Results of the one job on the cluster's own Redis (0 before it exists)."""
    jobs = cluster.store.recent_jobs(2)
    assert len(jobs) <= 1, jobs
    return cluster.store.status(jobs[0]).done if jobs else 0
