"""`imgq worker --gpus all|0,1` and `imgq worker --processes N`: one Celery worker process per GPU or core share.

Each child is a plain `imgq worker` (:func:`imgq.local.worker_command`, what the tests and the compose
file run too). A GPU child sees one GPU through ``CUDA_VISIBLE_DEVICES``, is named ``gpu<id>@%h``, loads
the model itself and requires CUDA (``IMGQ_DEVICE=cuda``: on a host without a usable GPU it refuses to
start instead of serving on the CPU under a GPU's name; only an explicit ``IMGQ_DEVICE=cpu`` / ``--device
cpu`` runs the GPU layout on the CPU). A CPU child (``--processes``) is named ``cpu<i>@%h``, sees no GPU,
and is pinned to its share of the cores with as many torch threads. Child i serves metrics on
``IMGQ_METRICS_PORT`` + i.

This module never imports torch, so the supervisor never initialises CUDA (a CUDA context does not survive
fork, and would hold memory on every GPU). ``--gpus all`` enumerates GPUs from ``CUDA_VISIBLE_DEVICES`` or
``nvidia-smi -L``.

SIGTERM/SIGINT are forwarded to every child (Celery's warm shutdown: running batches finish, prefetched ones
go back to the queue) and the supervisor exits when all children have. A child that exits on its own (a
worker exits 0 only when asked to stop) is restarted in place with back-off, at most
:data:`MAX_RESTARTS` times in :data:`RESTART_WINDOW_S`; past that the supervisor stops the others and exits
with the child's code, for Docker or systemd to restart the whole set. A child that refuses to start
(exit :attr:`imgq.errors.ExitCode.REFUSED`: no usable device or model) is not restarted: the supervisor stops the
others and exits with that code at once, the child's one-line reason above its own.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from imgq.errors import ExitCode, ImgqError
from imgq.local import worker_command
from imgq.settings import Settings
from model.pointer import require_champion

_GPU_ID = re.compile(r"\d+|(GPU|MIG)-[0-9A-Za-z-]+")
_PR_SET_PDEATHSIG = 1
# How often the supervisor looks at its children; also how soon it notices one died.
_POLL_S = 0.2
EXIT_REFUSED = ExitCode.REFUSED
# A child that stops on its own is restarted after BACKOFF_S, doubling per recent restart up to
# BACKOFF_MAX_S; more than MAX_RESTARTS restarts in RESTART_WINDOW_S and it is given up (a crash loop is
# not a fault that restarting fixes; the container's restart policy takes over).
BACKOFF_S = 1.0
BACKOFF_MAX_S = 16.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


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

    # A GPU child must get its GPU: with "auto" it would quietly serve on the CPU as gpu<id>@%h.
    device = "cpu" if settings.device == "cpu" else "cuda"
    return [Child(node(gpu), {"CUDA_VISIBLE_DEVICES": gpu, "IMGQ_DEVICE": device, **_metrics_env(settings, i)})
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


@dataclass
class _Slot:
    """One child's place: its current process, and when it was restarted lately."""

    child: Child
    proc: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)  # monotonic times, within RESTART_WINDOW_S
    restart_at: float | None = None  # a restart is pending until then


def _log(message: str) -> None:
    print(f"imgq worker: {message}", file=sys.stderr, flush=True)


def supervise(children: Sequence[Child], settings: Settings, *, queues: str | None = None,
              loglevel: str = "INFO") -> int:
    """Run the children, restarting one that stops on its own, until a forwarded signal stops them all (or a
    child refuses to start, or restarts too often); returns the exit code."""
    slots = [_Slot(child) for child in children]
    stopping = False
    asked: set[int] = set()  # pids that were running when the stop was forwarded

    def forward(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is None:
                asked.add(slot.proc.pid)
                slot.proc.send_signal(signum)

    base_env = {**os.environ, **settings.to_env()}

    def start(slot: _Slot, verb: str = "started") -> None:
        child = slot.child
        cmd = [*worker_command(name=child.name, queues=queues), "--loglevel", loglevel]
        # Own session: a terminal's Ctrl-C reaches the children once, through forward(), not twice (a
        # second SIGINT is Celery's cold shutdown).
        slot.proc = subprocess.Popen(cmd, env={**base_env, **child.env}, start_new_session=True,
                                     preexec_fn=_child_setup(child.cpus, os.getpid()))
        pinned = f", cpus {','.join(map(str, child.cpus))}" if child.cpus else ""
        _log(f"{verb} {child.name} (pid {slot.proc.pid}, CUDA_VISIBLE_DEVICES="
             f"{child.env.get('CUDA_VISIBLE_DEVICES', '')!r}, metrics port {child.env['IMGQ_METRICS_PORT']}"
             f"{pinned})")

    def on_exit(slot: _Slot, raw: int, now: float) -> int:
        """What to do about a child that stopped on its own: schedule its restart (0), or give up (a code)."""
        name, code = slot.child.name, _exit_code(raw)
        if raw == EXIT_REFUSED:
            _log(f"{name} refused to start (exit {code}; its reason is the line above); not restarting it, "
                 "restarting would not help: stopping the others")
            return code
        while slot.restarts and now - slot.restarts[0] > RESTART_WINDOW_S:
            slot.restarts.popleft()
        if len(slot.restarts) >= MAX_RESTARTS:
            _log(f"{name} exited with code {code}, its {len(slot.restarts) + 1}th exit within "
                 f"{RESTART_WINDOW_S:g} s; giving up: stopping the others")
            return code or 1
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** len(slot.restarts))
        slot.restarts.append(now)
        slot.restart_at = now + delay
        _log(f"{name} exited with code {code} on its own; restarting it in {delay:g} s "
             f"(restart {len(slot.restarts)} of at most {MAX_RESTARTS} in {RESTART_WINDOW_S:g} s)")
        return 0

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failure = 0
    try:
        for slot in slots:
            if stopping:
                break
            start(slot)
        while not stopping:
            now = time.monotonic()
            for slot in slots:
                if slot.proc is None or stopping or failure:
                    continue
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        slot.restart_at = None
                        start(slot, "restarted")
                    continue
                raw = slot.proc.poll()
                if raw is not None:
                    failure = on_exit(slot, raw, now)
            if failure:
                forward(signal.SIGTERM)
                break
            time.sleep(_POLL_S)
        for slot in slots:
            if slot.proc is not None:
                slot.proc.wait()
    except BaseException:
        forward(signal.SIGTERM)
        for slot in slots:
            if slot.proc is not None:
                slot.proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A child that had already died (its restart pending) is not counted in a requested stop.
    codes = [_exit_code(slot.proc.returncode) for slot in slots if slot.proc is not None and slot.proc.pid in asked]
    return failure or max(codes, default=0)


def _check_model(settings: Settings, queues: str | None) -> None:
    """The children's own first check, made once here: without a model every child would refuse."""
    if settings.classify_queue not in (queues or settings.classify_queue).split(","):
        return
    require_champion(settings.model_dir, settings.env_name("model_dir"))


def run_workers(settings: Settings, *, gpus: str | None, processes: int | None, queues: str | None,
                loglevel: str = "INFO") -> int:
    """What `imgq worker --gpus/--processes` runs."""
    children = gpu_children(resolve_gpus(gpus), settings) if gpus else cpu_children(processes or 0, settings)
    _check_model(settings, queues)
    if gpus and settings.device == "cpu":
        _log("IMGQ_DEVICE/--device is cpu: the --gpus workers serve on the CPU, as asked")
    return supervise(children, settings, queues=queues, loglevel=loglevel)
