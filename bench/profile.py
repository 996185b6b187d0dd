"""Profile what `make bench` measures, to see where the time goes before changing anything.

    python -m bench.profile worker [--model cnn] [--images 4000] [--native]   # py-spy on a live worker
    python -m bench.profile submit [--urls 200000]                             # pyinstrument on imgq submit

``worker`` samples the `imgq worker` process with ``py-spy record`` while it classifies a job, writes the
collapsed stacks (and a speedscope file) to ``bench/data/profiles/`` and prints the hottest frames, by
self time and by thread. ``submit`` runs the real `imgq submit` under pyinstrument against a private
redis-server.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import psutil

from bench.e2e import run_job
from bench.images import DATA_DIR, write_images
from bench.models import ensure_model
from bench.server import ImageServer, serve_images
from imgq.jobs import JobStore
from imgq.local import LocalCluster
from imgq.redis_server import RedisServer
from imgq.settings import Settings

OUT = DATA_DIR / "profiles"


def summarise(collapsed: Path, top: int = 25) -> None:
    """Self time per frame and samples per thread, from py-spy's collapsed ("raw") output."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        self_time[frames[-1]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
    print(f"{total} samples\n\nby thread:")
    for name, n in threads.most_common(12):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nself time:")
    for name, n in self_time.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive:")
    for name, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")


def thread_names(py_spy: str, pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name (pools' numbered threads share a name), from ``py-spy dump``."""
    dump = json.loads(subprocess.run([py_spy, "dump", "--pid", str(pid), "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    return {int(t["os_thread_id"]): str(t.get("thread_name") or "?").rstrip("0123456789").rstrip("_-")
            for t in dump if t.get("os_thread_id")}


def thread_cpu(pid: int, names: dict[int, str]) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds per thread name, from /proc via psutil (threads Python did not start:
    "native")."""
    out: dict[str, tuple[float, float]] = {}
    for t in psutil.Process(pid).threads():
        name = names.get(t.id, "native")
        user, system = out.get(name, (0.0, 0.0))
        out[name] = (user + t.user_time, system + t.system_time)
    return out


def profile_worker(model: str, images: int, native: bool, rate: int, peers: bool, gil: bool) -> None:
    """``peers``: bench.peers' job instead (its 600 images, its TorchScript model, its HTTP/1.0 server).
    ``gil``: sample only the thread holding the GIL (what serialises the others)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    OUT.mkdir(parents=True, exist_ok=True)
    files = write_images(600 if peers else 120)
    server: AbstractContextManager[ImageServer]
    if peers:
        from bench.peers.__main__ import WORK, http_server, prepare_model

        model, model_dir, server = "peers", prepare_model(WORK)[1], http_server(DATA_DIR)
    else:
        model_dir, server = ensure_model(model, DATA_DIR), serve_images(DATA_DIR)
    settings = Settings.from_env().replace(model_dir=model_dir, allow_networks=("127.0.0.0/8",))
    with server as served, LocalCluster(settings, workers=1) as cluster:
        urls = [f"{served.base}/{files[i % len(files)].name}?i={i}" for i in range(images)]
        store = JobStore.from_url(cluster.settings.redis_url, ttl_s=3600)
        pid = cluster.workers[0].proc.pid
        run_job(cluster, store, urls[:64])  # warm
        stem = OUT / f"worker-{model}"
        cmd = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--threads", "--format", "raw",
               "--output", f"{stem}.txt", "--nonblocking"]
        spy = subprocess.Popen([*cmd, *(["--native"] if native else []), *(["--gil"] if gil else [])],
                           stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        names = thread_names(py_spy, pid)
        before = thread_cpu(pid, names)
        seconds = run_job(cluster, store, urls)
        after = thread_cpu(pid, names)
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(timeout=60)
        store.r.close()
    print(f"{images} images in {seconds:.1f} s = {images / seconds:.1f} images/s (under the profiler)")
    print("\nworker CPU ms per image, by thread (psutil, not sampled):   user  system")
    per_image = {name: tuple(1000 * (a - b) / images for a, b in zip(after[name], before.get(name, (0, 0)),
                                                                      strict=True))
                 for name in after}
    for name, (user, system) in sorted(per_image.items(), key=lambda kv: -sum(kv[1])):
        if user + system >= 0.005:
            print(f"  {user + system:7.3f}  {name:<40} {user:7.3f} {system:7.3f}")
    print(f"  {sum(sum(v) for v in per_image.values()):7.3f}  total\n")
    summarise(Path(f"{stem}.txt"))
    print(f"\ncollapsed stacks: {stem}.txt (flamegraph.pl or speedscope.app read them)")


def profile_submit(urls: int) -> None:
    from bench.enqueue import write_url_file

    OUT.mkdir(parents=True, exist_ok=True)
    url_file = write_url_file(DATA_DIR / f"urls-{urls}.txt", urls)
    with RedisServer() as server:
        env = {**os.environ, "IMGQ_REDIS_URL": server.url, "IMGQ_MAX_QUEUE_DEPTH": str(10**9)}
        html = OUT / "submit.html"
        subprocess.run([sys.executable, "-m", "pyinstrument", "-o", str(html), "-r", "html", "-m", "cli",
                        "submit", str(url_file)], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "pyinstrument", "-m", "cli", "submit", str(url_file)],
                       env=env, check=True)
    print(f"html report: {html}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("worker", help="py-spy record on an imgq worker while it classifies a job")
    w.add_argument("--model", default="cnn", choices=("cnn", "resnet18"))
    w.add_argument("--images", type=int, default=4000)
    w.add_argument("--rate", type=int, default=200, help="samples/s")
    w.add_argument("--native", action="store_true", help="include C/C++ frames (torch, Pillow)")
    w.add_argument("--peers", action="store_true", help="bench.peers' job: its images, model and HTTP/1.0 server")
    w.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    s = sub.add_parser("submit", help="pyinstrument on imgq submit")
    s.add_argument("--urls", type=int, default=200_000)
    args = parser.parse_args(argv)
    if args.what == "worker":
        profile_worker(args.model, args.images, args.native, args.rate, args.peers, args.gil)
    else:
        profile_submit(args.urls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
