"""resnet18 at 224x224 on CUDA: images/s, and where the time goes, stage by stage.

    python -m bench.gpu [--batch-sizes 64,128,256] [--images 1024] [--amp auto|off|bf16|fp16] [--compile]
                        [--e2e N] [--out bench/results-gpu.json]

Stages, each timed alone (CUDA synchronised around it), per batch and per image:

* ``cpu_decode``: Pillow decode (JPEG draft mode) + preprocess on a thread pool of every core;
* ``gpu_decode``: nvJPEG decode + resize + normalise on the GPU (``IMGQ_GPU_DECODE``), Pillow for the rest;
* ``h2d``: the float batch from pinned host memory to the GPU;
* ``forward``: the model on a batch already on the GPU (mixed precision, channels_last, compile if asked);
* ``predict``: ``Classifier.predict`` as the worker calls it (copy in, forward, softmax, top-k, copy out).

Then whole pipelines in this process (decode overlapped with the forward of the previous batch), with
CPU decode and with GPU decode, and with ``--e2e N`` imgq end to end (Redis, Celery, HTTP) on N URLs.
Needs a CUDA device (exits with status 2 without one); ``--device cpu`` runs the CPU stages only, a smoke test
of this script on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.e2e import measure_e2e
from bench.images import DATA_DIR, write_images
from bench.models import ensure_model
from bench.server import serve_images
from imgq.errors import ItemError
from imgq.settings import AMP_CHOICES, Settings
from model.checkpoint import load_checkpoint
from model.classifier import Classifier, ServingOptions, configure_serving
from model.pointer import champion_version
from model.registry import version_dir
from worker.decode import prepare_image
from worker.gpu_decode import GpuDecoder


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Seconds per call, after one warm-up call (kernels selected, compile done, allocator warm)."""
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeat


def cpu_prepare(model: Classifier, bodies: Sequence[bytes], pool: ThreadPoolExecutor,
                settings: Settings) -> list[torch.Tensor]:
    return list(pool.map(lambda body: prepare_image(body, model, settings), bodies))


def gpu_prepare(decoder: GpuDecoder, model: Classifier, bodies: Sequence[bytes], pool: ThreadPoolExecutor,
                settings: Settings) -> list[torch.Tensor]:
    def fallback(rest: Sequence[bytes | ItemError]) -> list[torch.Tensor | ItemError]:
        return list(cpu_prepare(model, [b for b in rest if isinstance(b, bytes)], pool, settings))

    out = decoder.prepare(bodies, model, fallback)
    return [t for t in out if isinstance(t, torch.Tensor)]


def pipeline_ips(prepare: Callable[[Sequence[bytes]], list[torch.Tensor]], model: Classifier,
                 bodies: Sequence[bytes], batch: int, k: int) -> float:
    """Images/s with batch i+1 prepared (in a helper thread) while batch i runs through the model."""
    with ThreadPoolExecutor(max_workers=1) as ahead:
        def submit(i: int) -> Future[list[torch.Tensor]]:
            return ahead.submit(prepare, bodies[i:i + batch])

        model.predict(torch.stack(prepare(bodies[:batch])), k=k)  # warm
        _sync()
        start = time.perf_counter()
        pending = submit(0)
        for i in range(0, len(bodies), batch):
            tensors = pending.result()
            pending = submit(i + batch)
            if tensors:
                model.predict(torch.stack(tensors), k=k)
        _sync()
        return len(bodies) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--images", type=int, default=1024, help="in-memory images per pipeline run")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (IMGQ_COMPILE)")
    parser.add_argument("--e2e", type=int, default=4000, help="URLs through imgq end to end; 0 to skip")
    parser.add_argument("--concurrency", type=int, default=16, help="end to end: tasks in flight (IMGQ_CONCURRENCY)")
    parser.add_argument("--infer-batch", type=int, default=128, help="end to end: largest forward (IMGQ_INFER_BATCH)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: torch sees no CUDA device; run it on a GPU machine (or --device cpu)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    settings = Settings.from_env().replace(device=args.device, amp=args.amp, compile=args.compile)
    configure_serving(ServingOptions(amp=args.amp, compile=args.compile))
    model_dir = ensure_model("resnet18", DATA_DIR)
    model = load_checkpoint(version_dir(model_dir, champion_version(model_dir) or ""), device)
    files = write_images(120)
    bodies = [files[i % len(files)].read_bytes() for i in range(args.images)]
    decoder = GpuDecoder(settings, device) if device.type == "cuda" else None
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
        "cpu_cores": os.cpu_count(), "torch": torch.__version__,
        "amp": str(model.amp_dtype), "compile": args.compile, "channels_last": model.options.channels_last,
        "input_size": model.preprocess.size, "stages_ms_per_image": {}, "pipeline_ips": {},
    }
    print(f"{results['gpu']}, {os.cpu_count()} CPU cores, resnet18 {model.preprocess.size}px, "
          f"amp {results['amp']}, compile {args.compile}\n")
    print(f"{'batch':>5} {'cpu_decode':>10} {'gpu_decode':>10} {'h2d':>8} {'forward':>8} {'predict':>8}"
          "   (ms per image)   model-only img/s")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        def prep_cpu(chunk: Sequence[bytes]) -> list[torch.Tensor]:
            return cpu_prepare(model, chunk, pool, settings)

        def prep_gpu(chunk: Sequence[bytes]) -> list[torch.Tensor]:
            assert decoder is not None
            return gpu_prepare(decoder, model, chunk, pool, settings)

        for b in sizes:
            chunk = bodies[:b]
            host = torch.stack(cpu_prepare(model, chunk, pool, settings))
            if device.type == "cuda":
                host = host.pin_memory()
            on_device = host.to(device).contiguous(memory_format=torch.channels_last)
            stages = {
                "cpu_decode": timed(lambda: prep_cpu(chunk), 2),  # noqa: B023
                "h2d": timed(lambda: host.to(device, non_blocking=True), 10),  # noqa: B023
                "forward": timed(lambda: model.logits(on_device), 5),  # noqa: B023
                "predict": timed(lambda: model.predict(host, k=settings.topk), 5),  # noqa: B023
            }
            if decoder is not None:
                stages["gpu_decode"] = timed(lambda: prep_gpu(chunk), 3)  # noqa: B023
            per_image = {k: 1000 * v / b for k, v in stages.items()}
            results["stages_ms_per_image"][str(b)] = {k: round(v, 4) for k, v in per_image.items()}
            print(f"{b:>5} {per_image['cpu_decode']:>10.3f} {per_image.get('gpu_decode', float('nan')):>10.3f} "
                  f"{per_image['h2d']:>8.3f} {per_image['forward']:>8.3f} {per_image['predict']:>8.3f}"
                  f"   {1000 / per_image['forward']:>16.0f}")
        print(f"\n{'batch':>5} {'cpu decode + gpu forward':>26} {'gpu decode + gpu forward':>26}   (images/s)")
        for b in sizes:
            cpu_ips = pipeline_ips(prep_cpu, model, bodies, b, settings.topk)
            gpu_ips = pipeline_ips(prep_gpu, model, bodies, b, settings.topk) if decoder is not None else float("nan")
            results["pipeline_ips"][str(b)] = {"cpu_decode": round(cpu_ips, 1), "gpu_decode": round(gpu_ips, 1)}
            print(f"{b:>5} {cpu_ips:>26.1f} {gpu_ips:>26.1f}")
    if args.e2e:
        results["imgq_e2e"] = {}
        with serve_images(DATA_DIR) as server:
            urls = [f"{server.base}/{files[i % len(files)].name}?i={i}" for i in range(args.e2e)]
            for gpu_decode in (False, True) if decoder is not None else (False,):
                run = settings.replace(model_dir=model_dir, allow_networks=("127.0.0.0/8",), gpu_decode=gpu_decode,
                                       concurrency=args.concurrency, infer_batch=args.infer_batch)
                e2e = measure_e2e(run, urls, latency_jobs=50, other_pids={"image server": server.pid})
                key = "gpu_decode" if gpu_decode else "cpu_decode"
                results["imgq_e2e"][key] = {"ips": round(e2e.ips, 1), "one_url_p50_ms": round(e2e.one_url_p50_ms, 1),
                                            "one_url_p99_ms": round(e2e.one_url_p99_ms, 1),
                                            "worker_peak_rss_mb": round(e2e.worker_peak_rss_mb, 1),
                                            "cpu_ms_per_image": e2e.cpu_ms_per_image}
                print(f"imgq end to end, {key}: {e2e.ips:.1f} images/s, one-URL p50 {e2e.one_url_p50_ms:.1f} ms")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
