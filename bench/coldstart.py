"""Start-up figures: `imgq run` of 100 URLs, whole command; a worker's start to ready; first batch vs hundredth.

    python -m bench.coldstart [--runs 3] [--batches 100] [--out bench/coldstart.json]

- ``run_100_s``: wall seconds of `imgq run URLS -o FILE` (a fresh process: CLI, private Redis, one worker,
  the job, teardown) for 100 URLs with a trained model; the median of ``--runs``.
- ``worker_ready_s``: from starting `imgq worker` (a fresh process) to its first answer to a Celery ping,
  which it gives once the model is loaded and warmed up and the consumer is up; the median of ``--runs``.
- ``first_batch_ms`` / ``hundredth_batch_ms``: one batch of 16 URLs at a time, submit to last result, on a
  worker just ready: the first batch against the median of the 90th to 100th.

Wall-clock figures on whatever the machine is doing: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.e2e import run_job
from bench.images import DATA_DIR, write_images
from bench.models import ensure_model
from bench.server import serve_images
from imgq.jobs import JobStore
from imgq.local import LocalCluster
from imgq.settings import Settings

LOOPBACK = "127.0.0.0/8"
RUN_URLS = 100
BATCH_URLS = 16


@dataclass(frozen=True)
class ColdStart:
    run_100_s: float
    run_100_all_s: list[float]
    worker_ready_s: float
    worker_ready_all_s: list[float]
    first_batch_ms: float
    hundredth_batch_ms: float
    loadavg: list[float]

    @property
    def first_over_hundredth(self) -> float:
        return self.first_batch_ms / self.hundredth_batch_ms

    def describe(self) -> str:
        return (f"cold start: imgq run of {RUN_URLS} URLs {self.run_100_s:.2f} s (whole command; runs "
                f"{', '.join(f'{s:.2f}' for s in self.run_100_all_s)}); worker ready {self.worker_ready_s:.2f} s "
                f"after start ({', '.join(f'{s:.2f}' for s in self.worker_ready_all_s)}); first batch of "
                f"{BATCH_URLS} {self.first_batch_ms:.0f} ms vs the hundredth {self.hundredth_batch_ms:.0f} ms "
                f"({self.first_over_hundredth:.2f}x); load average {self.loadavg}")


def _env(model_dir: Path) -> dict[str, str]:
    return {**os.environ, "IMGQ_MODEL_DIR": str(model_dir), "IMGQ_METRICS_PORT": "0",
            "IMGQ_ALLOW_NETWORKS": LOOPBACK}


def time_run(urls_file: Path, model_dir: Path, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", "run", str(urls_file), "-o", str(out), "-q"],
                          env=_env(model_dir), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"imgq run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    labelled = sum(1 for r in records if r["label"] is not None)
    if len(records) != RUN_URLS or labelled != RUN_URLS:
        raise RuntimeError(f"imgq run wrote {len(records)} results, {labelled} labelled; expected {RUN_URLS}")
    return seconds


def time_worker_ready(settings: Settings) -> float:
    """A fresh `imgq worker` against a Redis already up: seconds from spawn to its first ping answer."""
    with LocalCluster(settings, workers=0) as cluster:
        start = time.perf_counter()
        cluster.start_worker()
        while not cluster.app.control.ping(timeout=0.05, limit=1):
            cluster.check_alive()
            if time.perf_counter() - start > 300:
                raise RuntimeError("worker not ready after 300 s")
        return time.perf_counter() - start


def time_batches(settings: Settings, urls: list[str], batches: int) -> list[float]:
    """Milliseconds per one-batch job, in order, on a worker that has just become ready."""
    with LocalCluster(settings, workers=1) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=3600)
        try:
            out = []
            for b in range(batches):
                batch = [f"{urls[(b * BATCH_URLS + i) % len(urls)]}&b={b}" for i in range(BATCH_URLS)]
                out.append(1000 * run_job(cluster, store, batch, poll_s=0.002))
            return out
        finally:
            store.r.close()


def measure_cold_start(*, runs: int = 3, batches: int = 100) -> ColdStart:
    files = write_images(40)
    model_dir = ensure_model("cnn", DATA_DIR)
    settings = Settings.from_env().replace(model_dir=model_dir, metrics_port=0, allow_networks=(LOOPBACK,),
                                           batch_size=BATCH_URLS)
    with serve_images(DATA_DIR) as server, tempfile.TemporaryDirectory(prefix="imgq-coldstart-") as tmp:
        urls = [f"{server.base}/{files[i % len(files)].name}?i={i}" for i in range(RUN_URLS * 20)]
        urls_file = Path(tmp) / "urls.txt"
        urls_file.write_text("\n".join(urls[:RUN_URLS]) + "\n")
        run_s = [time_run(urls_file, model_dir, Path(tmp) / "out.jsonl") for _ in range(runs)]
        ready_s = [time_worker_ready(settings) for _ in range(runs)]
        per_batch = time_batches(settings, urls, batches)
    later = per_batch[max(0, round(batches * 0.9) - 1):]
    return ColdStart(run_100_s=statistics.median(run_s), run_100_all_s=[round(s, 2) for s in run_s],
                     worker_ready_s=statistics.median(ready_s), worker_ready_all_s=[round(s, 2) for s in ready_s],
                     first_batch_ms=per_batch[0], hundredth_batch_ms=statistics.median(later),
                     loadavg=[round(x, 2) for x in os.getloadavg()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "coldstart.json")
    args = parser.parse_args(argv)
    result = measure_cold_start(runs=args.runs, batches=args.batches)
    args.out.write_text(json.dumps({**asdict(result), "first_over_hundredth": round(result.first_over_hundredth, 2)},
                                   indent=2) + "\n")
    print(result.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
