"""`make bench`: ceiling vs imgq vs naive images/s, one-URL latency, worker memory, a 1M-URL enqueue, cold start.

Everything runs on this machine's cores in one go, so the ratios compare like with like; the absolute
figures move with whatever else the machine is doing (the load average is printed with them).

    python -m bench.run [--models cnn,resnet18] [--quick] [--skip-enqueue] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.ceiling import CeilingResult, bound_ips, measure_ceiling
from bench.coldstart import measure_cold_start
from bench.e2e import measure_e2e
from bench.enqueue import measure_enqueue, write_url_file
from bench.images import DATA_DIR, write_images
from bench.models import BENCH_MODELS, ensure_model
from bench.naive import measure_naive
from bench.retrain import measure_retrain
from bench.server import ImageServer, serve_images
from imgq.settings import Settings
from model.classifier import ServingOptions, configure_serving, resolve_device
from model.registry import load_champion

LOOPBACK = ("127.0.0.0/8",)
DISTINCT_IMAGES = 120  # 40 of each size; URLs cycle over them (every URL is still fetched and decoded)
ENQUEUE_URLS = 1_000_000


@dataclass(frozen=True)
class Scale:
    """How many images each measurement uses: resnet18 on 2 CPU cores is ~50x slower than the CNN."""

    ceiling_images: int
    batch_sizes: tuple[int, ...]
    ceiling_passes: int  # the chosen configuration's runs go over the images this many times
    e2e_images: int
    naive_images: int
    latency_jobs: int
    # Images through the worker before its memory is first read: allocator arenas, connection pools and
    # buffers grow to their working size first (a one-off ramp); a leak keeps growing after it.
    warmup_images: int


SCALES = {
    "cnn": Scale(ceiling_images=768, batch_sizes=(32, 64, 128), ceiling_passes=5, e2e_images=20_000,
                 naive_images=400, latency_jobs=200, warmup_images=1000),
    "resnet18": Scale(ceiling_images=64, batch_sizes=(16, 32), ceiling_passes=2, e2e_images=400,
                      naive_images=40, latency_jobs=50, warmup_images=256),
}
QUICK = {
    "cnn": Scale(ceiling_images=256, batch_sizes=(32, 64), ceiling_passes=2, e2e_images=2000, naive_images=100,
                 latency_jobs=50, warmup_images=256),
    "resnet18": Scale(ceiling_images=32, batch_sizes=(16,), ceiling_passes=1, e2e_images=64, naive_images=10,
                      latency_jobs=10, warmup_images=16),
}


def bench_model(name: str, scale: Scale, server: ImageServer, files: list[Path], settings: Settings
                ) -> dict[str, Any]:
    model_dir = ensure_model(name, DATA_DIR)
    settings = settings.replace(model_dir=model_dir)
    bodies = [files[i % len(files)].read_bytes() for i in range(scale.ceiling_images)]
    urls = [f"{server.base}/{files[i % len(files)].name}?i={i}" for i in range(scale.e2e_images)]
    model = load_champion(model_dir, resolve_device(settings.device))  # where the worker will run it

    _say(f"[{name}] ceiling: {scale.ceiling_images} images in memory, batch sizes {scale.batch_sizes}")
    sweep = measure_ceiling(model, bodies, batch_sizes=scale.batch_sizes, settings=settings)
    # The sweep only chooses the configuration. Its fastest run is the best of ~15 short noisy ones, which
    # overstates the ceiling (winner's curse), so the figure comes from fresh, longer runs of that one
    # configuration: one before and one after imgq's run, the better counting (the machine may be shared).
    def remeasure() -> CeilingResult:
        return measure_ceiling(model, bodies, batch_sizes=scale.batch_sizes, settings=settings, only=sweep.best,
                               passes=scale.ceiling_passes)

    _say(f"[{name}] ceiling: {sweep.best.key} again, {scale.ceiling_passes} passes")
    before = remeasure()
    _say(f"[{name}] naive: {scale.naive_images} URLs one at a time")
    naive_runs = measure_naive(model_dir, urls[: scale.naive_images])
    naive = max(naive_runs.values())
    _say(f"[{name}] imgq: {scale.e2e_images} URLs end to end, then {scale.latency_jobs} one-URL jobs")
    e2e = measure_e2e(settings, urls, latency_jobs=scale.latency_jobs, warmup=scale.warmup_images,
                      other_pids={"image server": server.pid})
    _say(f"[{name}] ceiling: {sweep.best.key} once more after imgq")
    after = remeasure()
    ceiling = max(before, after, key=lambda c: c.ips)
    bound = bound_ips(ceiling.cpu_ms_per_image, e2e.cpu_ms_per_image.get("image server", 0.0))
    return {
        "ceiling_ips": round(ceiling.ips, 1),
        "imgq_ips": round(e2e.ips, 1),
        # Every core busy with the ceiling's work and the image server's per request (bench.ceiling.bound_ips):
        # no system decoding as the ceiling does and fetching from that server does better on this machine.
        "bound_ips": round(bound, 1),
        "bound_over_ceiling": round(bound / ceiling.ips, 3),
        "imgq_over_bound": round(e2e.ips / bound, 3),
        "naive_ips": round(naive, 1),
        "imgq_over_ceiling": round(e2e.ips / ceiling.ips, 3),
        "imgq_over_naive": round(e2e.ips / naive, 2),
        # Robust to other load on a shared machine: both keep the cores busy (see imgq_machine_idle_pct), so
        # the ratio of CPU spent per image is what the wall-clock ratio would be on cores of their own.
        "imgq_over_ceiling_by_cpu": round(ceiling.cpu_ms_per_image / sum(e2e.cpu_ms_per_image.values()), 3),
        "one_url_p50_ms": round(e2e.one_url_p50_ms, 1),
        "one_url_p99_ms": round(e2e.one_url_p99_ms, 1),
        "worker_peak_rss_mb": round(e2e.worker_peak_rss_mb, 1),
        "worker_rss_start_mb": round(e2e.rss_start_mb, 1),
        "worker_rss_end_mb": round(e2e.rss_end_mb, 1),
        "worker_rss_growth_pct": round(e2e.rss_growth_pct, 2),
        "worker_rss_timeline_mb": e2e.rss_timeline(),
        "imgq_images": e2e.images,
        "imgq_cpu_ms_per_image": e2e.cpu_ms_per_image,
        "imgq_cores_busy_pct": round(e2e.cpu_busy_pct, 1),
        "imgq_machine_idle_pct": round(e2e.machine_idle_pct, 1),
        "ceiling_best": {"config": ceiling.best.key, "cpu_ms_per_image": round(ceiling.cpu_ms_per_image, 3)},
        "naive_by_torch_threads_ips": {str(k): round(v, 1) for k, v in naive_runs.items()},
        "ceiling_runs_ips": [round(before.ips, 1), round(after.ips, 1)],
        "ceiling_images_per_run": scale.ceiling_images * scale.ceiling_passes,
        "ceiling_sweep_best_ips": round(sweep.ips, 1),
        "ceiling_tried_ips": {k: round(v, 1) for k, v in sweep.tried.items()},
        "input_size": BENCH_MODELS[name].input_size,
    }


def print_table(results: dict[str, Any]) -> None:
    head = (f"{'model':<9} {'ceiling':>8} {'imgq':>8} {'naive':>7} {'imgq/ceil':>9} {'imgq/naive':>10} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'peak RSS':>9} {'RSS growth':>10}")
    print("\n" + head)
    print("-" * len(head))
    for name in results["models"]:
        r = results[name]
        print(f"{name:<9} {r['ceiling_ips']:>8.1f} {r['imgq_ips']:>8.1f} {r['naive_ips']:>7.1f} "
              f"{r['imgq_over_ceiling']:>9.2f} {r['imgq_over_naive']:>10.1f} {r['one_url_p50_ms']:>7.1f} "
              f"{r['one_url_p99_ms']:>7.1f} {r['worker_peak_rss_mb']:>6.0f} MB "
              f"{r['worker_rss_growth_pct']:>+9.1f}%  (over {r['imgq_images']} images)")
    print("images/s; p50/p99: one-URL job, submit to result, warm worker; RSS: the worker process")
    for name in results["models"]:
        r = results[name]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["imgq_cpu_ms_per_image"].items())
        print(f"{name}: CPU ms per image: ceiling {r['ceiling_best']['cpu_ms_per_image']:.2f} "
              f"({r['ceiling_best']['config']}), imgq {sum(r['imgq_cpu_ms_per_image'].values()):.2f} ({parts}); "
              f"imgq/ceiling by CPU {r['imgq_over_ceiling_by_cpu']:.2f}; bound (every core busy with the "
              f"ceiling's and the image server's CPU per image) {r['bound_ips']:.1f} = {r['bound_over_ceiling']:.2f}x "
              f"the ceiling, "
              f"imgq/bound {r['imgq_over_bound']:.2f}; machine idle during imgq "
              f"{r['imgq_machine_idle_pct']:.0f}%; worker RSS {r['worker_rss_start_mb']:.0f} MB after warm-up, "
              f"{r['worker_rss_timeline_mb']} during, {r['worker_rss_end_mb']:.0f} MB at the end")
    if "enqueue_1m_s" in results:
        print(f"imgq submit, {results['enqueue_urls']:,} URLs: {results['enqueue_1m_s']:.1f} s, "
              f"peak RSS {results['enqueue_1m_peak_rss_mb']:.0f} MB "
              f"({results['enqueue_1m_rss_at_10pct_mb']:.0f} MB a tenth of the way in)")
    print(f"machine: {results['machine']['cores']} cores, {results['machine']['device']}, "
          f"load average {results['machine']['loadavg_start']} -> {results['machine']['loadavg_end']}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,resnet18", help="comma-separated: cnn, resnet18")
    parser.add_argument("--quick", action="store_true", help="a few seconds per figure (a smoke test)")
    parser.add_argument("--skip-enqueue", action="store_true", help="skip the 1M-URL imgq submit")
    parser.add_argument("--skip-coldstart", action="store_true", help="skip the start-up figures (bench.coldstart)")
    parser.add_argument("--skip-retrain", action="store_true", help="skip timing `imgq train` on the demo set")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown}; choose from {', '.join(BENCH_MODELS)}")

    started = time.time()
    load_start = os.getloadavg()
    # The worker settings are the defaults (plus any IMGQ_* in the environment); loopback is allowed
    # because the image server is on 127.0.0.1.
    settings = Settings.from_env()
    settings = settings.replace(allow_networks=tuple(sorted({*settings.allow_networks, *LOOPBACK})))
    configure_serving(ServingOptions(amp=settings.amp, compile=settings.compile,  # as the worker does
                                     optimize=settings.optimize))
    _say(f"writing {DISTINCT_IMAGES} photo-like JPEGs to {DATA_DIR} (kept for the next run)")
    files = write_images(DISTINCT_IMAGES)
    results: dict[str, Any] = {"models": names}
    cold_line = ""
    with serve_images(DATA_DIR) as server:
        for name in names:
            scales = QUICK if args.quick else SCALES
            results[name] = bench_model(name, scales[name], server, files, settings)
    if not args.skip_enqueue:
        count = 20_000 if args.quick else ENQUEUE_URLS
        _say(f"imgq submit of {count:,} URLs into a private redis-server (no workers)")
        enq = measure_enqueue(write_url_file(DATA_DIR / f"urls-{count}.txt", count), count)
        results.update(enqueue_1m_s=round(enq.seconds, 2), enqueue_1m_peak_rss_mb=round(enq.peak_rss_mb, 1),
                       enqueue_1m_rss_at_10pct_mb=round(enq.rss_at_10pct_mb, 1), enqueue_urls=enq.urls,
                       enqueue_messages=enq.messages)
    if not args.skip_coldstart:
        _say("cold start: imgq run of 100 URLs, worker start to ready, first batch vs hundredth")
        cold = measure_cold_start(runs=1 if args.quick else 3, batches=20 if args.quick else 100)
        results["cold_start"] = {"run_100_s": round(cold.run_100_s, 2), "run_100_all_s": cold.run_100_all_s,
                                 "worker_ready_s": round(cold.worker_ready_s, 2),
                                 "worker_ready_all_s": cold.worker_ready_all_s,
                                 "first_batch_ms": round(cold.first_batch_ms, 1),
                                 "hundredth_batch_ms": round(cold.hundredth_batch_ms, 1),
                                 "first_over_hundredth": round(cold.first_over_hundredth, 2),
                                 "loadavg": cold.loadavg}
        cold_line = cold.describe()
    if not args.skip_retrain:
        _say("imgq train --data demo (default CNN) in a fresh model dir")
        results.update(measure_retrain(epochs=2 if args.quick else None))
        print(f"retrain, default CNN on demo: {results['retrain_demo_cnn_s']:.0f} s to val accuracy "
              f"{results['retrain_demo_cnn_val_accuracy']:.3f} ({results['retrain_demo_cnn_epochs']} epochs)")
    results["machine"] = {
        "cores": os.cpu_count(), "device": "cuda" if torch.cuda.is_available() else "cpu (no GPU)",
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    results["settings"] = {k: v for k, v in settings.to_env().items()
                           if k not in ("IMGQ_REDIS_URL", "IMGQ_MODEL_DIR")}
    results["quick"] = args.quick
    results["wall_s"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    if cold_line:
        print(cold_line)
    print(f"wrote {args.out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
