"""A big job end to end, with Redis memory bounded by what is in flight: the streamed export against today's.

The same job runs twice, each time on a private redis-server and real `imgq worker` processes, submitted by
the real `imgq submit` (streamed file, backpressure at ``--queue-depth`` batches): once with `imgq results
JOB --follow` running alongside (results leave Redis for part files as they finish: "streamed"), once with
every result left in the results hash ("hash", today's design without --follow). Images are tiny JPEGs (the
served model's input size, a few hundred bytes) from bench/server.py on 127.0.0.1, so the job is bound by
imgq's per-URL costs, not by decoding. Reported per design:

- images/s sustained over the first and the last tenth of the job (flat, or does it slow as it grows?);
- Redis ``used_memory_peak`` minus Redis's use before the job (the job's peak, whatever key held it);
- Redis bytes per finished URL at rest (MEMORY USAGE of the job's keys after the export, over the URLs);
- the part files' bytes per URL.

    python -m bench.bigjob [--urls 1000000] [--quick] [--sizes 100000,1000000] [--designs streamed,hash]
                           [--workers 1] [--part-size 10000] [--queue-depth 64] [--out bench/bigjob.json]

``--sizes`` runs several job sizes in one go (the peak should not depend on the job's size). The machine may
be shared: rates move with the load average (printed), memory figures do not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from bench.models import BENCH_MODELS, ensure_model
from bench.server import serve_images
from imgq import keys
from imgq.jobs import JobStore
from imgq.local import LocalCluster
from imgq.settings import Settings

DESIGNS = ("streamed", "hash")
DISTINCT_IMAGES = 16  # URLs cycle over them; a query string makes each URL distinct
POLL_S = 0.5


@dataclass
class Run:
    design: str
    urls: int
    seconds: float
    ips_first_tenth: float
    ips_last_tenth: float
    redis_peak_bytes: int  # used_memory_peak minus used_memory before the job
    redis_bytes_per_url_at_rest: float  # the job's keys after the job (and its export) over its URLs
    job_keys_bytes: dict[str, int] = field(default_factory=dict)
    parts: int = 0
    part_bytes_per_url: float = 0.0
    record_json_bytes: float = 0.0  # mean JSON result record (a JSONL line less its newline), from a sample
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # at the end of the run

    @property
    def flat(self) -> float:
        """Last tenth's rate over the first's: 1.0 is flat."""
        return self.ips_last_tenth / self.ips_first_tenth if self.ips_first_tenth else 0.0


def write_tiny_images(root: Path, size: int) -> None:
    for i in range(DISTINCT_IMAGES):
        im = Image.new("RGB", (size, size), ((i * 53) % 256, (i * 97) % 256, (i * 151) % 256))
        for x in range(0, size, 4):  # a little structure, so the JPEG is not one flat block
            im.putpixel((x, (x * (i + 1)) % size), (255, 255, 255))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
        (root / f"tiny_{i:02d}.jpg").write_bytes(out.getvalue())


def write_url_file(path: Path, base: str, count: int) -> Path:
    with path.open("w") as fh:
        fh.writelines(f"{base}/tiny_{i % DISTINCT_IMAGES:02d}.jpg?n={i}\n" for i in range(count))
    return path


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _imgq(*args: str, env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, text=True, **kw)


def run_design(design: str, url_file: Path, count: int, settings: Settings, work: Path, *, workers: int,
               part_size: int, timeout_s: float) -> Run:
    with LocalCluster(settings, workers=workers) as cluster:
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=settings.job_ttl_s)
        client: redis.Redis = store.r
        env = {**os.environ, **cluster.settings.to_env()}
        before = int(client.info("memory")["used_memory"])
        start = time.monotonic()
        # Its stderr to a log: with a shallow queue it warns each time the queue fills up again.
        with open(work / f"submit-{design}-{count}.log", "w") as log:
            submit = _imgq("submit", str(url_file), "-q", env=env, stdout=subprocess.PIPE, stderr=log)
        deadline = start + timeout_s
        while not (recent := store.recent_jobs(1)):
            if submit.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imgq submit exited with {submit.returncode} before creating a job")
            time.sleep(0.05)
        job = recent[0]
        parts = work / f"parts-{design}-{count}"
        follow = None
        if design == "streamed":
            follow = _imgq("results", job, "--follow", "-o", str(parts), "--part-size", str(part_size), "-q",
                           env=env, stdout=subprocess.DEVNULL)
        samples: list[tuple[float, int]] = []
        while True:
            status = store.status(job)
            samples.append((time.monotonic(), status.done))
            if status.state == "done":
                break
            cluster.check_alive()
            if follow is not None and follow.poll() is not None:
                raise RuntimeError(f"the exporter exited with {follow.returncode} before the job was done")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job}: {status.done}/{status.total} after {timeout_s:g} s")
            time.sleep(POLL_S)
        seconds = samples[-1][0] - start
        if submit.wait(timeout=60) != 0:
            raise RuntimeError(f"imgq submit exited with {submit.returncode}")
        if follow is not None and follow.wait(timeout=600) != 0:
            raise RuntimeError(f"the exporter exited with {follow.returncode}")
        peak = int(client.info("memory")["used_memory_peak"]) - before
        sample: dict[bytes, bytes] = client.hscan(keys.results(job), 0, count=1000)[1]  # type: ignore[assignment]
        record_bytes = sum(len(v) for v in sample.values()) / len(sample) if sample else 0.0
        held = {k.decode().removeprefix(keys.job(job)) or "(job)": int(client.memory_usage(k) or 0)
                for k in client.scan_iter(keys.job_pattern(job))}
        files = sorted(parts.glob("part-*")) if follow is not None else []
        first, last = _tenth_rates(samples, count)
        store.r.close()
    return Run(design=design, urls=count, seconds=round(seconds, 1), ips_first_tenth=round(first, 1),
               ips_last_tenth=round(last, 1), redis_peak_bytes=peak,
               redis_bytes_per_url_at_rest=round(sum(held.values()) / count, 3), job_keys_bytes=held,
               parts=len(files), part_bytes_per_url=round(sum(f.stat().st_size for f in files) / count, 1),
               record_json_bytes=round(record_bytes, 1),
               loadavg=os.getloadavg())


def _tenth_rates(samples: list[tuple[float, int]], count: int) -> tuple[float, float]:
    """images/s from the first result to a tenth of the job, and from nine tenths to the end (by count)."""
    def at(n: int) -> tuple[float, int]:
        return next((t, d) for t, d in samples if d >= n)

    t0, d0 = at(1)
    t1, d1 = at(count // 10)
    t9, d9 = at(count - count // 10)
    t_end, d_end = samples[-1]
    return (d1 - d0) / max(t1 - t0, 1e-9), (d_end - d9) / max(t_end - t9, 1e-9)


def print_table(runs: list[Run]) -> None:
    head = (f"{'design':<9} {'URLs':>9} {'seconds':>8} {'img/s 1st':>9} {'img/s last':>10} {'last/1st':>8} "
            f"{'Redis peak':>11} {'B/URL rest':>10} {'parts':>6} {'part B/URL':>10}")
    print("\n" + head)
    print("-" * len(head))
    for r in runs:
        print(f"{r.design:<9} {r.urls:>9,} {r.seconds:>8.0f} {r.ips_first_tenth:>9.0f} {r.ips_last_tenth:>10.0f} "
              f"{r.flat:>8.2f} {r.redis_peak_bytes / 2**20:>8.1f} MB {r.redis_bytes_per_url_at_rest:>10.2f} "
              f"{r.parts:>6} {r.part_bytes_per_url:>10.1f}")
    print("img/s over the first and the last tenth of the job; Redis peak: used_memory_peak minus Redis's use "
          "before the job; B/URL rest: the job's keys after it (and its export) over its URLs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bigjob", description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=1_000_000, help="URLs in the job (default 1,000,000)")
    parser.add_argument("--sizes", help="several job sizes, comma-separated (overrides --urls)")
    parser.add_argument("--quick", action="store_true", help="20,000 URLs")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="streamed (with --follow), hash (without)")
    parser.add_argument("--workers", type=int, default=1, help="`imgq worker` processes")
    parser.add_argument("--part-size", type=int, default=10_000, help="records per part file (--follow)")
    parser.add_argument("--queue-depth", type=int, default=64, help="IMGQ_MAX_QUEUE_DEPTH: batches queued at most")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "bigjob.json")
    args = parser.parse_args(argv)
    sizes = [20_000] if args.quick else [int(s) for s in (args.sizes or str(args.urls)).split(",")]
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if unknown := [d for d in designs if d not in DESIGNS]:
        parser.error(f"unknown design {unknown}; choose from {', '.join(DESIGNS)}")

    load_start = os.getloadavg()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="imgq-bigjob-") as tmp:
        work = Path(tmp)
        model_dir = ensure_model("cnn", work)  # untrained: throughput does not depend on the weights
        images = work / "images"
        images.mkdir()
        write_tiny_images(images, BENCH_MODELS["cnn"].input_size)
        base = Settings.from_env()
        loopback = tuple(sorted({*base.allow_networks, "127.0.0.0/8"}))  # the image server is on 127.0.0.1
        settings = base.replace(model_dir=model_dir, allow_networks=loopback, max_queue_depth=args.queue_depth)
        with serve_images(images) as server:
            for count in sizes:
                url_file = write_url_file(work / f"urls-{count}.txt", server.base, count)
                for design in designs:
                    _say(f"{design}: {count:,} URLs, {args.workers} worker(s), load average {os.getloadavg()}")
                    run = run_design(design, url_file, count, settings, work, workers=args.workers,
                                     part_size=args.part_size, timeout_s=args.timeout)
                    _say(f"  {run.seconds:.0f} s, {run.ips_first_tenth:.0f} -> {run.ips_last_tenth:.0f} img/s, "
                         f"Redis peak {run.redis_peak_bytes / 2**20:.1f} MB, {run.redis_bytes_per_url_at_rest:.2f} "
                         "B/URL at rest")
                    runs.append(run)
    print_table(runs)
    print(f"load average {load_start} -> {os.getloadavg()} on {os.cpu_count()} cores; part size "
          f"{args.part_size:,}, queue depth {args.queue_depth} batches of {settings.batch_size}")
    out = {"runs": [{**asdict(r), "flat": round(r.flat, 3)} for r in runs],
           "part_size": args.part_size, "queue_depth": args.queue_depth, "batch_size": settings.batch_size,
           "workers": args.workers, "cores": os.cpu_count(), "loadavg_start": load_start,
           "loadavg_end": os.getloadavg()}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
