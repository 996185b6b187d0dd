"""One row of the peers table, run in a process of its own:

    python -m bench.peers.rows ROW SPEC.json OUT.json

SPEC (written by bench.peers.__main__) names the URL file, the TorchScript model, imgq's registry holding it,
the distinct image files and the row's time bound. OUT gets {"ips", "wall_s", "images", "labels", ...}
(and "fetches" where the row fetched more than its images):
``ips`` is images per second from the first request to the last label, ``wall_s`` the whole thing as a user
runs it (imports, start-up, model load and shut-down included).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench.peers  # noqa: F401  (telemetry off before anything imports daft)

Spec = dict[str, Any]
Row = Callable[[Spec], dict[str, Any]]
_T0 = time.perf_counter()  # this process's start: the wall of in-process rows counts their imports


def _jit_model(spec: Spec) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and still the API
        return torch.jit.load(spec["model_ts"], map_location="cpu").eval()  # type: ignore[no-untyped-call]


def _normaliser(spec: Spec) -> Callable[[Any], Any]:
    import torch

    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
    return lambda batch: (batch.float() / 255 - mean) / std


def _pixels(body: bytes, size: int, *, draft: bool) -> Any:
    """RGB uint8 3 x size x size from JPEG bytes; ``draft``: let libjpeg decode at 1/2, 1/4 or 1/8 scale."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(body)) as im:
        if draft:
            im.draft("RGB", (size, size))
        rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # a writable copy, as torch wants


def _urls(spec: Spec) -> list[str]:
    return Path(spec["urls_file"]).read_text().split()


def row_ceiling(spec: Spec) -> dict[str, Any]:
    """imgq's own decode and forward on bytes in RAM (bench.ceiling): the best a worker could do here."""
    from bench.ceiling import measure_ceiling
    from imgq.settings import Settings
    from model.registry import load_champion

    model = load_champion(Path(spec["model_dir"]))
    bodies = [Path(p).read_bytes() for p in spec["images"]]
    settings = Settings()
    sweep = measure_ceiling(model, bodies[:256], batch_sizes=(32, 64), settings=settings)  # chooses only
    start = time.perf_counter()
    best = measure_ceiling(model, bodies, batch_sizes=(sweep.best.batch_size,), settings=settings, only=sweep.best,
                           passes=spec["passes"])
    seconds = time.perf_counter() - start
    return {"ips": best.ips, "wall_s": seconds, "images": len(bodies) * spec["passes"], "config": best.best.key,
            "cpu_ms_per_image": best.cpu_ms_per_image, "note": "bytes already in memory: no fetch, no queue"}


def row_daft(spec: Spec) -> dict[str, Any]:
    import daft
    import torch
    from daft import DataType, col

    model_ts, size, normalise = spec["model_ts"], spec["input_size"], _normaliser(spec)
    classes = spec["classes"]

    @daft.cls
    class Classify:
        def __init__(self) -> None:
            self.model = _jit_model(spec)

        @daft.method.batch(return_dtype=DataType.string(), batch_size=64)
        def __call__(self, data: daft.Series) -> list[str | None]:
            bodies = data.to_pylist()
            ok = [i for i, b in enumerate(bodies) if b]
            labels: list[str | None] = [None] * len(bodies)
            if ok:
                batch = normalise(torch.stack([_pixels(bodies[i], size, draft=True) for i in ok]))
                with torch.inference_mode():
                    top = self.model(batch).argmax(dim=1).tolist()
                for i, t in zip(ok, top, strict=True):
                    labels[i] = classes[t]
            return labels

    del model_ts
    urls = _urls(spec)
    start = time.perf_counter()
    df = daft.from_pydict({"url": urls})
    df = df.with_column("data", col("url").download(on_error="null"))
    df = df.with_column("label", Classify()(col("data")))  # type: ignore[arg-type]  # @daft.cls retypes it
    out = df.select("url", "label").to_pydict()
    seconds = time.perf_counter() - start
    by_url = dict(zip(out["url"], out["label"], strict=True))  # Daft may reorder rows; URLs are distinct
    return {"ips": len(urls) / seconds, "wall_s": time.perf_counter() - _T0, "images": len(urls),
            "labels": [by_url.get(u) for u in urls], "daft": daft.__version__}


def row_tutorial(spec: Spec) -> dict[str, Any]:
    """The loop a tutorial writes: fetch one (urllib, a new connection), decode it whole, one forward pass."""
    import torch

    model, size, normalise, classes = _jit_model(spec), spec["input_size"], _normaliser(spec), spec["classes"]
    urls, labels = _urls(spec), []
    start = time.perf_counter()
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as resp:  # loopback only: the URLs are ours
            body = resp.read()
        with torch.inference_mode():
            labels.append(classes[int(model(normalise(_pixels(body, size, draft=False)[None])).argmax(dim=1))])
        if time.perf_counter() - start > spec["max_s"]:
            break  # bounded: the rate over what it did is the figure
    seconds = time.perf_counter() - start
    partial = len(labels) < len(urls)
    return {"ips": len(labels) / seconds, "wall_s": time.perf_counter() - _T0, "images": len(labels),
            "labels": labels + [None] * (len(urls) - len(labels)), "partial": partial,
            **({"note": f"stopped after {spec['max_s']} s; wall is for the images done"} if partial else {})}


def _imgq_env(spec: Spec, **more: str) -> dict[str, str]:
    return {**os.environ, "IMGQ_MODEL_DIR": spec["model_dir"], "IMGQ_ALLOW_NETWORKS": "127.0.0.0/8", **more}


def _labels(path: Path) -> list[str | None]:
    return [json.loads(line)["label"] for line in path.read_text().splitlines() if line.strip()]


def row_imgq_run(spec: Spec) -> dict[str, Any]:
    out = Path(spec["work"]) / "imgq-run.jsonl"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", "run", spec["urls_file"], "-o", str(out), "-q"],
                          env=_imgq_env(spec), capture_output=True, text=True, timeout=spec["timeout_s"])
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"imgq run exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    # "job ...: N URLs, ...; 12.34 s, 486.1 images/s": submit to last result, as imgq measures it
    found = re.search(r"([\d.]+) s, ([\d.]+) images/s", proc.stderr)
    if found is None:
        raise RuntimeError(f"imgq run printed no summary: {proc.stderr.strip()[-500:]}")
    return {"ips": float(found.group(2)), "wall_s": wall, "images": len(_urls(spec)), "labels": _labels(out),
            "summary": proc.stderr.strip().splitlines()[-1]}


def row_imgq_cluster(spec: Spec) -> dict[str, Any]:
    from bench.e2e import run_job
    from imgq.jobs import JobStore
    from imgq.local import LocalCluster
    from imgq.settings import Settings

    urls = _urls(spec)
    settings = Settings.from_env(_imgq_env(spec))
    with LocalCluster(settings, workers=1) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=3600)
        try:
            warm = urls[:64]
            run_job(cluster, store, warm)  # warm: connections, allocator, kernels
            seconds = run_job(cluster, store, urls, poll_s=0.05)
            out = Path(spec["work"]) / "imgq-submit.jsonl"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "cli", "submit", spec["urls_file"], "--wait", "-o", str(out),
                                   "-q"], env=_imgq_env(spec, IMGQ_REDIS_URL=cluster.settings.redis_url),
                                  capture_output=True, text=True, timeout=spec["timeout_s"])
            wall = time.perf_counter() - start
        finally:
            store.r.close()
    if proc.returncode != 0:
        raise RuntimeError(f"imgq submit --wait exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return {"ips": len(urls) / seconds, "wall_s": wall, "images": len(urls), "labels": _labels(out),
            "fetches": len(warm) + 2 * len(urls),  # the warm-up job, the measured one and `imgq submit --wait`'s
            "note": "ips: submit to last result on a warm worker; wall: `imgq submit --wait` as a command"}


ROWS: dict[str, Row] = {"ceiling": row_ceiling, "daft": row_daft, "imgq run": row_imgq_run,
                        "imgq cluster": row_imgq_cluster, "tutorial": row_tutorial}


def main(argv: list[str]) -> int:
    row, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = ROWS[row](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
