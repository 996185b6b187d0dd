"""`imgq worker --gpus/--processes`: real child `imgq worker` processes, checked from the outside.

No GPU is needed: with IMGQ_DEVICE=cpu set explicitly, a child pinned to a GPU id that does not exist serves on
CPU, which is enough to check what each child was given (CUDA_VISIBLE_DEVICES, node name, metrics port, CPU
affinity) and that the supervisor itself never loads torch (so it cannot have touched CUDA). Without that
setting a GPU child requires CUDA (tests/test_startup_and_input.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from imgq.errors import ImgqError
from imgq.redis_server import RedisServer, free_port
from imgq.settings import Settings
from tests.support import TEST_ENV
from worker.app import create_app
from worker.supervisor import cpu_shares, parse_nvidia_smi, resolve_gpus

HOST = socket.gethostname()

NVIDIA_SMI_L = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-aaaa-bbbb-cccc-111111111111)
  MIG 3g.40gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
"""


def test_gpu_lists_resolve_from_flags_env_or_nvidia_smi() -> None:
    assert parse_nvidia_smi(NVIDIA_SMI_L) == ["0", "1"]
    assert resolve_gpus("all", {}, lambda: NVIDIA_SMI_L) == ["0", "1"]
    # An explicit CUDA_VISIBLE_DEVICES wins over what nvidia-smi lists: it is what this process may use.
    assert resolve_gpus("all", {"CUDA_VISIBLE_DEVICES": "2, 3"}, lambda: NVIDIA_SMI_L) == ["2", "3"]
    assert resolve_gpus("1,0", {}, lambda: "") == ["1", "0"]
    with pytest.raises(ImgqError, match="no GPU found"):
        resolve_gpus("all", {}, lambda: "")
    with pytest.raises(ImgqError, match="no GPU found"):
        resolve_gpus("all", {"CUDA_VISIBLE_DEVICES": ""}, lambda: NVIDIA_SMI_L)
    with pytest.raises(ImgqError, match="GPU indices"):
        resolve_gpus("0,gpu1", {}, lambda: "")
    with pytest.raises(ImgqError, match="twice"):
        resolve_gpus("0,0", {}, lambda: "")
    assert cpu_shares(2, [0, 1, 2, 3, 4]) == [(0, 1, 2), (3, 4)]
    assert cpu_shares(3, [0, 1]) == [(), (), ()]


def _port_pair() -> int:
    """A port p with p + 1 free too (children get port + i)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports")


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


class Supervised:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", *args], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def wait_for_nodes(self, app: Celery, names: set[str], timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            replies = {node for reply in app.control.ping(timeout=0.5) for node in reply}
            if replies >= names:
                assert replies == names, replies
                return
            assert self.proc.poll() is None, self.tail()
            assert time.monotonic() < deadline, f"only {replies} answered:\n{self.tail()}"

    def children(self) -> list[psutil.Process]:
        return sorted(psutil.Process(self.proc.pid).children(), key=lambda p: p.pid)

    def stop(self) -> int:
        children = self.children()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "children outlived the supervisor"
        return code


@pytest.fixture
def redis_url() -> Iterator[str]:
    with RedisServer() as server:  # private: ping must see only this test's workers
        yield server.url


def _env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **TEST_ENV, "IMGQ_REDIS_URL": redis_url, "IMGQ_MODEL_DIR": str(model_dir), **extra}
    env.pop("IMGQ_TORCH_THREADS")  # --processes picks it per child
    return env


def test_gpus_all_starts_one_named_pinned_worker_per_visible_gpu(redis_url: str, model_dir: Path,
                                                                 tmp_path: Path) -> None:
    port = _port_pair()
    sup = Supervised(["--gpus", "all"], _env(redis_url, model_dir, CUDA_VISIBLE_DEVICES="3,5", IMGQ_DEVICE="cpu",
                                             IMGQ_METRICS_PORT=str(port)), tmp_path / "sup.log")
    app = create_app(Settings.from_env({"IMGQ_REDIS_URL": redis_url}))
    try:
        sup.wait_for_nodes(app, {f"gpu3@{HOST}", f"gpu5@{HOST}"})
        children = sup.children()
        assert [c.environ()["CUDA_VISIBLE_DEVICES"] for c in children] == ["3", "5"]
        assert all("worker" in c.cmdline() for c in children)
        # Each child says who it is on its own metrics port: port + i.
        for i, gpu in enumerate(["3", "5"]):
            (labels, _), = _scrape(port + i)["imgq_worker_info"]
            assert labels["node"] == f"gpu{gpu}@{HOST}" and labels["cuda_visible_devices"] == gpu
            assert int(labels["pid"]) == children[i].pid
        # The model was loaded in the children; the supervisor never loaded torch, so never touched CUDA.
        maps = Path(f"/proc/{sup.proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "libcuda" not in maps
        assert all("libtorch" in Path(f"/proc/{c.pid}/maps").read_text() for c in children)
        assert sup.stop() == 0
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
        app.close()


def test_processes_split_the_cores_and_hide_gpus(redis_url: str, model_dir: Path, tmp_path: Path) -> None:
    sup = Supervised(["--processes", "2"], _env(redis_url, model_dir, CUDA_VISIBLE_DEVICES="0"),
                     tmp_path / "sup.log")
    app = create_app(Settings.from_env({"IMGQ_REDIS_URL": redis_url}))
    try:
        sup.wait_for_nodes(app, {f"cpu0@{HOST}", f"cpu1@{HOST}"})
        children = sup.children()
        envs = [c.environ() for c in children]
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["", ""]
        assert [e["IMGQ_DEVICE"] for e in envs] == ["cpu", "cpu"]
        cores = sorted(os.sched_getaffinity(0))
        affinities = [c.cpu_affinity() for c in children]
        if len(cores) >= 2:  # each child on its own share, together all cores, torch threads = share size
            assert sorted(affinities[0] + affinities[1]) == cores and not set(affinities[0]) & set(affinities[1])
            assert [e["IMGQ_TORCH_THREADS"] for e in envs] == [str(len(a)) for a in affinities]
        assert sup.stop() == 0
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
        app.close()


def test_a_child_that_cannot_start_stops_the_supervisor(redis_url: str, tmp_path: Path) -> None:
    sup = Supervised(["--gpus", "0,1"], _env(redis_url, tmp_path / "no-models"), tmp_path / "sup.log")
    assert sup.proc.wait(timeout=120) == 1
    assert "train one first" in sup.log.read_text()
