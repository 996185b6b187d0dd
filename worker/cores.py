"""How a worker process divides the CPU cores it may use between torch and the decode pool.

Torch's intra-op threads meet at a barrier after every op, so one of them preempted by a decode thread
stalls the rest: on 2 busy cores, 2 torch threads ran the default CNN 2-40x slower than 1. So on CPU each
forward pass gets half the cores (at least one), enough forward passes run at once to cover the cores
(a forward-bound model still uses them all), and decoding, which Pillow runs without the GIL, gets one
thread per core; the OS shares the cores between them as the load shifts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from imgq.settings import Settings

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: the affinity mask is the limit
    return max(1, cores)


def torch_threads(settings: Settings, device: torch.device) -> int | None:
    """Intra-op threads for torch, or None to keep torch's default (CUDA: the GPU does the work)."""
    if settings.torch_threads:
        return settings.torch_threads
    if device.type == "cuda":
        return None
    return max(1, available_cores() // 2)


def infer_threads(settings: Settings, device: torch.device) -> int:
    """Forward passes at once: on CPU enough that they cover the cores between them."""
    if settings.infer_threads:
        return settings.infer_threads
    if device.type == "cuda":
        return 1
    return max(1, available_cores() // (torch_threads(settings, device) or 1))


def decode_threads(settings: Settings) -> int:
    # At least 2, so one image's decode never waits behind another's on a single core.
    return settings.decode_threads or max(2, available_cores())
