"""`imgq status` without a job id, and `imgq report JOB`, through the real CLI against real workers."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from model.pointer import champion_version
from tests.support import TEST_ENV, Cluster, ImageSite, closed_port_url


def imgq(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_status_without_a_job_shows_queues_workers_throughput_champion_and_jobs(
        private_cluster: Cluster, image_site: ImageSite, model_dir: Path) -> None:
    env = {**TEST_ENV, "IMGQ_REDIS_URL": private_cluster.settings.redis_url, "IMGQ_MODEL_DIR": str(model_dir)}
    urls = [*list(image_site.truth)[:19], image_site.url("missing.jpg")]
    job = private_cluster.submit(urls)  # no worker yet: its 2 batches wait in the queue

    before = json.loads(imgq("status", "--json", env=env).stdout)
    assert before["queues"] == {"imgq.classify": 2, "imgq.train": 0}
    assert before["workers"] == [] and before["written_last_minute"] == 0
    assert before["champion"] == champion_version(model_dir)
    assert [(j["job_id"], j["state"], j["total"], j["done"]) for j in before["jobs"]] == [(job, "running", 20, 0)]

    private_cluster.start_worker("watched@%h")
    private_cluster.wait(job)
    after = json.loads(imgq("status", "--json", env=env).stdout)
    assert after["queues"] == {"imgq.classify": 0, "imgq.train": 0} and after["unacked"] == 0
    assert after["workers"] == [f"watched@{socket.gethostname()}"]
    assert after["written_last_minute"] == 20
    (row,) = after["jobs"]
    assert (row["job_id"], row["state"], row["done"], row["failed"]) == (job, "done", 20, 1)

    text = imgq("status", env=env)
    assert text.returncode == 0, text.stderr
    assert "1 live (watched@" in text.stdout and "20 results in the last minute" in text.stdout
    assert re.search(rf"{job}\s+done\s+20/20\s+failed 1", text.stdout), text.stdout


def test_report_shows_every_item_once_with_thumbnails_filters_and_distribution(
        cluster: Cluster, image_site: ImageSite, tmp_path: Path) -> None:
    # One image that is classified, then removed: its thumbnail fetch fails and it gets a placeholder.
    first = next(iter(image_site.truth))
    src = image_site.root / first.removeprefix(image_site.base + "/")
    (image_site.root / "vanishing").mkdir(exist_ok=True)
    shutil.copy(src, image_site.root / "vanishing" / "x.png")
    good = list(image_site.truth)[:14]
    bad = [image_site.url("no/such.jpg"), image_site.url("bad/page.jpg"), closed_port_url()]
    urls = [*good[:7], *bad, image_site.url("vanishing/x.png"), *good[7:]]
    job = cluster.submit(urls)
    cluster.wait(job)
    (image_site.root / "vanishing" / "x.png").unlink()
    results = cluster.results(job)
    labels = Counter(str(r["label"]) for r in results if not r["error"])
    codes = Counter(str(r["error"]["code"]) for r in results if r["error"])  # type: ignore[index]
    assert sum(labels.values()) == 15 and codes == {"http_status": 1, "not_an_image": 1, "unreachable": 1}

    out = tmp_path / "report.html"
    proc = imgq("report", job, "-o", str(out), env={**TEST_ENV, "IMGQ_REDIS_URL": cluster.settings.redis_url})
    assert proc.returncode == 0, proc.stderr
    assert f"{len(urls)} items, 14 thumbnails" in proc.stderr
    page = out.read_text()

    cards = re.findall(r'<figure class="item[^"]*" data-index="(\d+)"', page)
    assert sorted(map(int, cards)) == list(range(len(urls)))  # every item exactly once
    thumbs = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) == 14
    assert max(Image.open(io.BytesIO(base64.b64decode(thumbs[0]))).size) <= 96
    vanished = re.search(r'<figure[^>]*data-index="10".*?</figure>', page, re.S)
    assert vanished and "no thumbnail" in vanished.group(0)
    for code in codes:
        assert f'data-error="{code}"' in page and f'<option value="{code}">' in page
    assert page.count('class="item failed"') == 3

    # Filters, the sort toggle and one distribution bar per class, with its count.
    assert 'id="filter-label"' in page and 'id="filter-error"' in page and 'id="sort-low-confidence"' in page
    for label, n in labels.items():
        assert f'<option value="{label}">' in page
        assert re.search(rf'<span class="bar-name" title="{label}">{label}</span>.*?<span class="bar-count">{n} ',
                         page), label
    # Self-contained: nothing is loaded from anywhere.
    assert "default-src 'none'" in page
    assert set(re.findall(r'src="([a-z]+):', page)) == {"data"}
    assert not re.search(r"<link|@import|url\(", page)
