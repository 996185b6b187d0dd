"""`imgq worker --gpus all|0,1` and `imgq worker --processes N`: one Celery worker process per GPU or core share.

Each child is a plain `imgq worker` (:func:`producer.local.worker_command`, what the tests and the compose
file run too). A GPU child sees one GPU through ``CUDA_VISIBLE_DEVICES``, is named ``gpu<id>@%h`` and loads
the model itself; a CPU child (``--processes``) is named ``cpu<i>@%h``, sees no GPU, and is pinned to its
share of the cores with as many torch threads. Child i serves metrics on ``IMGQ_METRICS_PORT`` + i.

This module never imports torch, so the supervisor never initialises CUDA (a CUDA context does not survive
fork, and would hold memory on every GPU). ``--gpus all`` enumerates GPUs from ``CUDA_VISIBLE_DEVICES`` or
``nvidia-smi -L``.

SIGTERM/SIGINT are forwarded to every child (Celery's warm shutdown: running batches finish, prefetched ones
go back to the queue) and the supervisor exits when all children have. A child that exits on its own stops
the others and the supervisor exits with its code, so Docker or systemd restarts the whole set instead of
the host quietly serving on fewer GPUs.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from imgq.errors import ImgqError
from imgq.settings import Settings
from producer.local import worker_command

_GPU_ID = re.compile(r"\d+|(GPU|MIG)-[0-9A-Za-z-]+")
_PR_SET_PDEATHSIG = 1
# How often the supervisor looks at its children; also how soon it notices one died.
_POLL_S = 0.2


@dataclass(frozen=True)
class Child:
    name: str                                              # Celery node name, e.g. gpu0@%h
    env: dict[str, str]                                    # on top of the parent's environment and settings
    cpus: tuple[int, ...] = field(default=())              # CPU affinity; () = inherit


def parse_nvidia_smi(listing: str) -> list[str]:
    """GPU indices from `nvidia-smi -L` ("GPU 0: NVIDIA H100 ... (UUID: GPU-...)"; MIG lines are indented)."""
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def resolve_gpus(spec: str, env: Mapping[str, str] | None = None,
                 list_gpus: Callable[[], str] = _nvidia_smi) -> list[str]:
    """The GPU ids for ``--gpus``: ``all`` or a comma-separated list of indices or GPU UUIDs."""
    env = os.environ if env is None else env
    if spec.strip() == "all":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        # An explicit CUDA_VISIBLE_DEVICES is the set this process may use, even if nvidia-smi lists more.
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible is not None else \
            parse_nvidia_smi(list_gpus())
        if not gpus:
            raise ImgqError("--gpus all: no GPU found (CUDA_VISIBLE_DEVICES is empty or `nvidia-smi -L` lists "
                            "none); name GPUs with --gpus 0,1 or run CPU workers with --processes N")
    else:
        gpus = [g.strip() for g in spec.split(",") if g.strip()]
    bad = [g for g in gpus if not _GPU_ID.fullmatch(g)]
    if bad or not gpus:
        raise ImgqError(f"--gpus {spec!r}: use all, or GPU indices / UUIDs separated by commas, e.g. 0,1")
    if len(set(gpus)) != len(gpus):
        raise ImgqError(f"--gpus {spec!r} names a GPU twice: two processes would share it")
    return gpus


def _metrics_env(settings: Settings, i: int) -> dict[str, str]:
    port = settings.metrics_port + i if settings.metrics_port else 0
    if port > 65535:
        raise ImgqError(f"IMGQ_METRICS_PORT={settings.metrics_port} + {i} is past 65535")
    return {"IMGQ_METRICS_PORT": str(port)}


def gpu_children(gpus: Sequence[str], settings: Settings) -> list[Child]:
    def node(gpu: str) -> str:
        return f"gpu{gpu}@%h" if gpu.isdigit() else f"gpu-{gpu.lower()}@%h"

    return [Child(node(gpu), {"CUDA_VISIBLE_DEVICES": gpu, **_metrics_env(settings, i)})
            for i, gpu in enumerate(gpus)]


def cpu_shares(n: int, cpus: Sequence[int]) -> list[tuple[int, ...]]:
    """Split ``cpus`` into ``n`` contiguous, near-equal shares; no pinning (all ``()``) if there are fewer cores."""
    if n > len(cpus):
        return [()] * n
    size, extra = divmod(len(cpus), n)
    shares, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        shares.append(tuple(cpus[start:end]))
        start = end
    return shares


def cpu_children(n: int, settings: Settings, cpus: Sequence[int] | None = None) -> list[Child]:
    if n < 1:
        raise ImgqError(f"--processes {n}: must be at least 1")
    if settings.device == "cuda":
        raise ImgqError("--processes starts CPU workers, but IMGQ_DEVICE/--device is cuda; use --gpus instead")
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    children = []
    for i, share in enumerate(cpu_shares(n, cpus)):
        # One torch thread per core of the share: N processes x all cores would oversubscribe the host.
        threads = settings.torch_threads or max(1, len(share) or len(cpus) // n)
        env = {"CUDA_VISIBLE_DEVICES": "", "IMGQ_DEVICE": "cpu", "IMGQ_TORCH_THREADS": str(threads),
               **_metrics_env(settings, i)}
        children.append(Child(f"cpu{i}@%h", env, share))
    return children


def _child_setup(cpus: tuple[int, ...], parent: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        # If the supervisor is killed outright (SIGKILL, OOM), its children get SIGTERM instead of lingering.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def supervise(children: Sequence[Child], settings: Settings, *, queues: str | None = None,
              loglevel: str = "INFO") -> int:
    """Run the children until a forwarded signal (or one child's exit) stops them all; returns the exit code."""
    procs: list[tuple[Child, subprocess.Popen[bytes]]] = []
    stopping = False

    def forward(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failure = 0
    try:
        base_env = {**os.environ, **settings.to_env()}
        for child in children:
            if stopping:
                break
            cmd = [*worker_command(name=child.name, queues=queues), "--loglevel", loglevel]
            # Own session: a terminal's Ctrl-C reaches the children once, through forward(), not twice (a
            # second SIGINT is Celery's cold shutdown).
            proc = subprocess.Popen(cmd, env={**base_env, **child.env}, start_new_session=True,
                                    preexec_fn=_child_setup(child.cpus, os.getpid()))
            procs.append((child, proc))
            pinned = f", cpus {','.join(map(str, child.cpus))}" if child.cpus else ""
            print(f"imgq worker: started {child.name} (pid {proc.pid}, CUDA_VISIBLE_DEVICES="
                  f"{child.env.get('CUDA_VISIBLE_DEVICES', '')!r}, metrics port {child.env['IMGQ_METRICS_PORT']}"
                  f"{pinned})", file=sys.stderr, flush=True)
        while any(proc.poll() is None for _, proc in procs):
            for child, proc in procs:
                code = proc.poll()
                if code is not None and not stopping:
                    print(f"imgq worker: {child.name} exited with code {code}; stopping the others",
                          file=sys.stderr, flush=True)
                    failure = _exit_code(code) or 1
                    forward(signal.SIGTERM)
            time.sleep(_POLL_S)
    except BaseException:
        forward(signal.SIGTERM)
        for _, proc in procs:
            proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [_exit_code(proc.returncode) for _, proc in procs]
    return failure or max(codes, default=0)


def run_workers(settings: Settings, *, gpus: str | None, processes: int | None, queues: str | None,
                loglevel: str = "INFO") -> int:
    """What `imgq worker --gpus/--processes` runs."""
    children = gpu_children(resolve_gpus(gpus), settings) if gpus else cpu_children(processes or 0, settings)
    return supervise(children, settings, queues=queues, loglevel=loglevel)
