"""`python -m bench.peers [--quick] [--rows ...] [--out bench/peers.json]`: see bench/peers/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil

import bench.peers  # noqa: F401  (telemetry off before anything imports daft)
from bench.ceiling import bound_ips
from bench.images import DATA_DIR, write_images
from bench.server import ImageServer, serve_images
from imgq.errors import ImgqError
from imgq.redis_server import free_port

ROWS = ("ceiling", "daft", "imgq run", "imgq cluster", "tutorial")
INPUT_SIZE = 64
FETCHES_PER_IMAGE = 10
FULL_IMAGES, QUICK_IMAGES = 600, 60
# Seconds a row may take before it is stopped (the tutorial stops itself at its soft bound and reports
# the rate over what it did).
ROW_TIMEOUT_S = {False: 1800, True: 600}
TUTORIAL_MAX_S = {False: 600.0, True: 120.0}
WORK = DATA_DIR / "peers"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare_model(work: Path) -> tuple[Path, Path, list[str]]:
    """imgq's default CNN (untrained, seed 0) as TorchScript, registered in ``work/models`` with
    `imgq models add --promote`. Returns (the .ts file, the registry, the classes)."""
    import torch

    from model.demo_data import CLASSES
    from model.net import ModelConfig, build_model
    from model.pointer import champion_version

    models, ts = work / "models", work / "cnn.ts"
    classes = list(CLASSES[: ModelConfig().num_classes])
    if champion_version(models) is not None and ts.is_file():
        return ts, models, classes
    torch.manual_seed(0)
    module = build_model(ModelConfig(input_size=INPUT_SIZE)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, and still the API
        torch.jit.script(module).save(str(ts))  # type: ignore[no-untyped-call]
    proc = subprocess.run([sys.executable, "-m", "cli", "models", "add", str(ts), "--classes", ",".join(classes),
                           "--input-size", str(INPUT_SIZE), "--promote", "-q"],
                          env={**os.environ, "IMGQ_MODEL_DIR": str(models),
                               "IMGQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},  # none: disk only
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"bench.peers: imgq models add failed: {proc.stderr.strip()}")
    return ts, models, classes


@contextmanager
def http_server(root: Path) -> Iterator[ImageServer]:
    """bench.peers.httpserver on ``root``; one line and an exit if it does not start."""
    with ExitStack() as stack:
        try:
            served = stack.enter_context(serve_images(root, module="bench.peers.httpserver",
                                                      what="bench.peers: the image server"))
        except ImgqError as exc:
            raise SystemExit(str(exc)) from None
        yield served


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_row(row: str, spec: dict[str, Any], work: Path, timeout_s: float, server_pid: int) -> dict[str, Any]:
    """``row`` in a fresh interpreter (its own imports and threads), bounded by ``timeout_s``. Also measured
    around it: the image server's CPU and how idle the machine was (the row's start-up included)."""
    name = row.replace(" ", "-")
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    server_before, machine_before = _cpu_s(server_pid), psutil.cpu_times()
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.peers.rows", row, str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout_s:g} s"}
    result: dict[str, Any] = (json.loads(out_path.read_text()) if proc.returncode == 0 and out_path.is_file()
                              else {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]})
    result["process_s"] = round(time.perf_counter() - start, 2)
    machine_after = psutil.cpu_times()
    busy = sum(machine_after) - sum(machine_before)
    result["machine_idle_pct"] = round(100 * (machine_after.idle - machine_before.idle) / busy, 1) if busy else None
    if "images" in result and row != "ceiling":  # the ceiling fetches nothing: the server's CPU is idle noise
        fetches = result.get("fetches", result["images"])
        result["server_cpu_ms_per_image"] = round(1000 * (_cpu_s(server_pid) - server_before) / fetches, 3)
    result["load_before"], result["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    return result


def agreement(labels: Sequence[str | None], reference: Sequence[str | None]) -> float | None:
    pairs = [(a, b) for a, b in zip(labels, reference, strict=False) if a is not None and b is not None]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'system':<14}{'img/s':>9}{'wall s':>9}{'images':>8}{'labelled':>10}{'load':>12}{'idle %':>8}"
             f"{'server ms':>10}  note"]
    for row, r in results.items():
        if "error" in r:
            lines.append(f"{row:<14}{'-':>9}{'-':>9}{'-':>8}{'-':>10}{'':>12}{'':>8}{'':>10}  failed: {r['error']}")
            continue
        labelled = sum(label is not None for label in r.get("labels", [])) if "labels" in r else r["images"]
        load = f"{r['load_before']:.1f}->{r['load_after']:.1f}"
        idle = "-" if r.get("machine_idle_pct") is None else f"{r['machine_idle_pct']:.0f}"
        server = "-" if "server_cpu_ms_per_image" not in r else f"{r['server_cpu_ms_per_image']:.2f}"
        lines.append(f"{row:<14}{r['ips']:>9.1f}{r['wall_s']:>9.1f}{r['images']:>8}{labelled:>10}{load:>12}"
                     f"{idle:>8}{server:>10}  {r.get('note', '')}")
    ips = {row: r["ips"] for row, r in results.items() if "ips" in r}
    for imgq_row in ("imgq run", "imgq cluster"):
        for other in ("daft", "ceiling"):
            if imgq_row in ips and other in ips:
                lines.append(f"{imgq_row} / {other}: {ips[imgq_row] / ips[other]:.2f}x")
    found = bound(results)
    if found is not None:
        server_ms, limit = found
        lines.append(f"bound: {limit:.1f} img/s, every one of the {os.cpu_count()} cores busy with the ceiling's "
                     f"{results['ceiling']['cpu_ms_per_image']:.2f} ms and the image server's {server_ms:.2f} ms of "
                     "CPU per image (no system that decodes and runs the model as the ceiling does, fetching from "
                     "this server, does better)")
        if "daft" in ips:
            goal = GOAL_OVER_DAFT * ips["daft"]
            lines.append(f"{GOAL_OVER_DAFT}x daft = {goal:.1f} img/s = {goal / limit:.2f}x the bound")
        for imgq_row in ("imgq run", "imgq cluster"):
            if imgq_row in ips:
                lines.append(f"{imgq_row} / bound: {ips[imgq_row] / limit:.2f}x")
    return "\n".join(lines)


GOAL_OVER_DAFT = 1.3  # issue 14's goal for imgq against Daft
ONCE = ("tutorial",)  # a minute and a half a round, and no goal rides on it: one round


def median_run(row_runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median images/s (the lower middle one of an even count); a failed round counts as
    the figure only when every round failed."""
    good = sorted((r for r in row_runs if "ips" in r), key=lambda r: float(r["ips"]))
    return good[(len(good) - 1) // 2] if good else row_runs[-1]


def rounds(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Each row's images/s round by round, and imgq's ratio to Daft within each round (side by side, so
    the machine's drift between rounds cancels)."""
    lines = [f"{row}: " + ", ".join(f"{r['ips']:.1f}" if "ips" in r else "failed" for r in row_runs) + " img/s"
             for row, row_runs in runs.items() if len(row_runs) > 1]
    for imgq_row in ("imgq run", "imgq cluster"):
        pairs = [(a["ips"], b["ips"]) for a, b in zip(runs.get(imgq_row, []), runs.get("daft", []), strict=False)
                 if "ips" in a and "ips" in b]
        if len(pairs) > 1:
            ratios = sorted(a / b for a, b in pairs)
            lines.append(f"{imgq_row} / daft by round: " + ", ".join(f"{a / b:.2f}x" for a, b in pairs)
                         + f" (median {ratios[(len(ratios) - 1) // 2]:.2f}x)")
    return "\n".join(lines)


def bound(results: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
    """(server CPU ms per request, img/s): every core busy with the ceiling's and the image server's CPU per
    image (bench.ceiling.bound_ips). The server's CPU is the median over the rows that fetched."""
    server = sorted(r["server_cpu_ms_per_image"] for r in results.values() if "server_cpu_ms_per_image" in r)
    ceiling = results.get("ceiling", {}).get("cpu_ms_per_image")
    if not server or not ceiling:
        return None
    server_ms = server[len(server) // 2]
    return server_ms, bound_ips(ceiling, server_ms)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, "
                        f"{QUICK_IMAGES * FETCHES_PER_IMAGE} URLs")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="rounds of the rows (the tutorial runs once); each row's median round is its figure. "
                             "This VM's speed drifts by tens of percent within minutes: rows measured side by side in "
                             "one round compare fairly, single rows of one round may not")
    parser.add_argument("--out", type=Path, default=Path("bench/peers.json"))
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    work = WORK / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    n_images = QUICK_IMAGES if args.quick else FULL_IMAGES
    _say(f"bench.peers: {n_images} photo-like JPEGs in {DATA_DIR} (written once), the model, the server")
    files = write_images(n_images)
    ts, models, classes = prepare_model(WORK)
    from model.preprocess import IMAGENET_MEAN, IMAGENET_STD

    with http_server(DATA_DIR) as server:
        base = server.base
        # Image i's k-th fetch: distinct URLs (no cache can answer), the same bytes every time.
        urls = [f"{base}/{files[i].name}?k={k}" for k in range(FETCHES_PER_IMAGE) for i in range(n_images)]
        urls_file = work / "urls.txt"
        urls_file.write_text("\n".join(urls) + "\n")
        spec = {"urls_file": str(urls_file), "model_ts": str(ts), "model_dir": str(models), "classes": classes,
                "input_size": INPUT_SIZE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "images": [str(f) for f in files], "passes": FETCHES_PER_IMAGE, "work": str(work),
                "timeout_s": ROW_TIMEOUT_S[args.quick], "max_s": TUTORIAL_MAX_S[args.quick]}
        runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
        for round_ in range(args.repeat):
            for row in rows if round_ % 2 == 0 else rows[::-1]:  # alternate: a drift within a round cancels
                if row in ONCE and round_:
                    continue
                _say(f"bench.peers: {row} ({len(urls)} images; round {round_ + 1} of {args.repeat})")
                runs[row].append(run_row(row, spec, work, ROW_TIMEOUT_S[args.quick], server.pid))
        results = {row: median_run(row_runs) for row, row_runs in runs.items()}
    reference = results.get("imgq run", {}).get("labels")
    for r in results.values():
        if reference and "labels" in r:
            r["agrees_with_imgq_run"] = agreement(r["labels"], reference)
    print(table(results))
    print(rounds(runs))
    found = bound(results)
    report = {"quick": args.quick, "bound_ips": None if found is None else round(found[1], 1),
              "urls": len(urls), "distinct_images": n_images, "input_size": INPUT_SIZE,
              "cores": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg(),
              "rows": {row: {k: v for k, v in r.items() if k != "labels"} for row, r in results.items()},
              "rounds": {row: [r.get("ips") for r in row_runs] for row, row_runs in runs.items()}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _say(f"bench.peers: wrote {args.out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
