"""The ceiling: images already in memory as bytes -> decode + preprocess + forward, at the best batch size.

The same code the worker runs (``decode_image`` with JPEG draft mode, the model's ``Preprocess``,
``Classifier.predict``) with nothing else in the way: no fetch, no Redis, no Celery. Decoding runs on a
pool of one thread per core. Three ways to schedule it, each tried at every batch size:

* ``sequential``: decode a batch on every core, then run it through the model;
* ``pipelined``: decode the next batch while the model runs this one (as the worker does);
* ``pipelined-xN``: the same with N forward passes at once, one torch thread each (as the worker does on
  CPU by default).

with torch's threads at 1 and at the core count. The fastest is the ceiling's configuration; bench.run
then measures it again, longer, for the figure (the maximum of many short noisy runs overstates it).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from imgq.settings import Settings
from model.classifier import Classifier
from worker.decode import prepare_image


def bound_ips(ceiling_cpu_ms_per_image: float, server_cpu_ms_per_image: float, cores: int | None = None) -> float:
    """Images/s with every core busy all the time, each image costing the ceiling's CPU (decode, preprocess,
    forward) plus what the image server on the same cores spends on its request: cores / (ceiling + server)
    CPU seconds per image. No system that decodes and runs the model as the ceiling does and fetches from
    that server here does better, whatever its fetching costs; it is above the ceiling's own images/s
    wherever the ceiling leaves a core idle part of the time."""
    return (cores or os.cpu_count() or 1) * 1000 / (ceiling_cpu_ms_per_image + server_cpu_ms_per_image)


@dataclass(frozen=True)
class Config:
    batch_size: int
    torch_threads: int
    forwards: int  # forward passes at once; 0 = sequential (no overlap with decoding)

    @property
    def key(self) -> str:
        mode = "sequential" if not self.forwards else "pipelined" + (f"-x{self.forwards}" if self.forwards > 1 else "")
        return f"b{self.batch_size}/t{self.torch_threads}/{mode}"


@dataclass(frozen=True)
class CeilingResult:
    ips: float
    best: Config
    tried: dict[str, float]  # Config.key -> images/s
    cpu_ms_per_image: float  # of the best run: this process's CPU time (all threads) per image


def run_once(model: Classifier, bodies: Sequence[bytes], config: Config, *, pool: ThreadPoolExecutor,
             settings: Settings) -> tuple[float, float]:
    """(images/s, CPU ms per image) for one pass over ``bodies``."""
    b = config.batch_size

    def submit(i: int) -> list[Future[torch.Tensor]]:
        return [pool.submit(prepare_image, body, model, settings) for body in bodies[i:i + b]]

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=max(1, config.forwards)) as forward:
        running: collections.deque[Future[object]] = collections.deque()
        pending = submit(0)
        for i in range(0, len(bodies), b):
            batch = torch.stack([f.result() for f in pending])
            if not config.forwards:
                model.predict(batch, k=settings.topk)
                pending = submit(i + b)
                continue
            pending = submit(i + b)
            running.append(forward.submit(model.predict, batch, k=settings.topk))
            while len(running) >= config.forwards:  # at most `forwards` in the model, the next one decoding
                running.popleft().result()
        for f in running:
            f.result()
    return len(bodies) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / len(bodies)


def configs_for(batch_sizes: Sequence[int], cores: int) -> list[Config]:
    out = []
    for b in batch_sizes:
        for threads in sorted({1, cores}):
            out += [Config(b, threads, 0), Config(b, threads, 1)]
        if cores > 1:
            out.append(Config(b, 1, cores))
    return out


def measure_ceiling(model: Classifier, bodies: Sequence[bytes], *, batch_sizes: Sequence[int],
                    settings: Settings, only: Config | None = None, passes: int = 1) -> CeilingResult:
    """Every configuration for these batch sizes, or ``only`` one (to measure the best one again), each over
    ``passes`` passes through ``bodies``."""
    cores = os.cpu_count() or 1
    configs = [only] if only is not None else configs_for(batch_sizes, cores)
    bodies = list(bodies) * passes
    before = torch.get_num_threads()
    tried: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        with ThreadPoolExecutor(max_workers=cores) as pool:
            warm = Config(max(batch_sizes), 1, 1)  # allocator, kernels, lazy imports
            run_once(model, bodies[: warm.batch_size], warm, pool=pool, settings=settings)
            for config in configs:
                torch.set_num_threads(config.torch_threads)
                tried[config.key], cpu[config.key] = run_once(model, bodies, config, pool=pool, settings=settings)
    finally:
        torch.set_num_threads(before)
    best = max(configs, key=lambda c: tried[c.key])
    return CeilingResult(ips=tried[best.key], best=best, tried=tried, cpu_ms_per_image=cpu[best.key])
