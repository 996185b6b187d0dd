"""bench.peers: the tutorial-loop row and the Daft row, each in its own process as the harness runs them, on
21 URLs over loopback HTTP/1.0: every URL gets the label the model gives its image."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bench.peers
from bench.images import write_images
from bench.peers.__main__ import bound, http_server, median_run, rounds, table
from bench.peers.rows import _pixels

CLASSES = ["red", "green", "blue"]
SIZE = 64


class Brightest(nn.Module):
    """Logits = each channel's mean: the label depends on the image, so a label at the wrong URL shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("peers")
    files = write_images(3, work / "images")  # 640x480, 1024x768, 1600x1200
    ts = work / "brightest.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(Brightest()).save(str(ts))  # type: ignore[no-untyped-call]
    with http_server(work / "images") as server:
        urls = [f"{server.base}/{f.name}?k={k}" for k in range(7) for f in files]
        (work / "urls.txt").write_text("\n".join(urls) + "\n")
        spec = {"urls_file": str(work / "urls.txt"), "model_ts": str(ts), "model_dir": str(work / "models"),
                "classes": CLASSES, "input_size": SIZE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                "images": [str(f) for f in files], "passes": 7, "work": str(work), "timeout_s": 300, "max_s": 300}
        (work / "spec.json").write_text(json.dumps(spec))
        yield work, urls, files


def expected(files: list[Path], urls: list[str], *, draft: bool) -> list[str]:
    model = Brightest()
    by_name = {f.name: CLASSES[int(model(_pixels(f.read_bytes(), SIZE, draft=draft)[None].float() / 255).argmax())]
               for f in files}
    return [by_name[url.rsplit("/", 1)[1].split("?")[0]] for url in urls]


def run_row(work: Path, row: str) -> dict[str, Any]:
    out = work / f"{row}.out.json"
    proc = subprocess.run([sys.executable, "-m", "bench.peers.rows", row, str(work / "spec.json"), str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_the_tutorial_row_labels_every_url(job: Any) -> None:
    work, urls, files = job
    result = run_row(work, "tutorial")
    assert result["images"] == len(urls) == 21 and not result["partial"]
    assert result["labels"] == expected(files, urls, draft=False)
    assert result["ips"] > 0 and result["wall_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("daft") is None,
                    reason="daft is not installed (it is in the [bench] extra: pip install -e '.[bench]')")
def test_the_daft_row_labels_every_url_with_telemetry_off(job: Any) -> None:
    work, urls, files = job
    assert all(os.environ[k] == v for k, v in bench.peers.TELEMETRY_OFF.items())  # children inherit these
    result = run_row(work, "daft")
    assert result["images"] == len(urls)
    assert result["labels"] == expected(files, urls, draft=True)  # Pillow's draft mode, as the UDF decodes
    assert result["ips"] > 0 and result["daft"]


def test_the_bound_is_every_core_busy_with_the_ceilings_and_the_servers_cpu_per_image() -> None:
    cores = os.cpu_count() or 1
    row = {"wall_s": 1.0, "images": 100, "load_before": 0.0, "load_after": 0.0, "machine_idle_pct": 5.0}
    results = {"ceiling": {**row, "ips": 400.0, "cpu_ms_per_image": 4.5},
               "daft": {**row, "ips": 300.0, "server_cpu_ms_per_image": 0.9},
               "imgq cluster": {**row, "ips": 320.0, "server_cpu_ms_per_image": 0.8},
               "imgq run": {**row, "ips": 310.0, "server_cpu_ms_per_image": 1.0}}
    server_ms, bound_ips = bound(results) or (0.0, 0.0)
    assert server_ms == 0.9  # the median of the rows that fetched
    assert bound_ips == pytest.approx(cores * 1000 / (4.5 + 0.9))
    printed = table(results)
    assert f"bound: {bound_ips:.1f} img/s" in printed
    assert f"1.3x daft = 390.0 img/s = {390 / bound_ips:.2f}x the bound" in printed
    assert f"imgq cluster / bound: {320 / bound_ips:.2f}x" in printed
    assert bound({"daft": results["daft"]}) is None  # no ceiling row: no bound


def test_rounds_give_each_row_its_median_and_imgqs_ratio_to_daft_round_by_round() -> None:
    runs: dict[str, list[dict[str, Any]]] = {
        "daft": [{"ips": 300.0}, {"ips": 250.0}, {"error": "stopped"}],
        "imgq cluster": [{"ips": 330.0}, {"ips": 325.0}, {"ips": 360.0}],
        "tutorial": [{"ips": 60.0}],
    }
    assert median_run(runs["daft"]) == {"ips": 250.0}  # the lower middle of the rounds that ran
    assert median_run(runs["imgq cluster"]) == {"ips": 330.0}
    assert median_run([{"error": "a"}, {"error": "b"}]) == {"error": "b"}
    printed = rounds(runs)
    assert "daft: 300.0, 250.0, failed img/s" in printed
    assert "imgq cluster / daft by round: 1.10x, 1.30x (median 1.10x)" in printed  # the failed round pairs nothing
    assert "tutorial:" not in printed  # one round: the table has it
