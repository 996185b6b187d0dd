"""`imgq demo` (what `make demo` runs): train if needed, serve held-out images, classify them, score.

Everything is local: the demo images are generated, served from 127.0.0.1 and fetched through the same
path as any URL, with loopback explicitly allowed (it is blocked by default).
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

from imgq.settings import Settings
from model.champion import Champion
from model.demo_data import write_imagefolder
from model.pointer import champion_version
from model.train import EpochStats, TrainConfig, train
from producer.run import RunReport, run_job

LOOPBACK = ("127.0.0.0/8",)


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: workers reuse pooled connections

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    # The default listen backlog of 5 drops SYNs when a worker opens dozens of connections at once.
    request_queue_size = 256
    daemon_threads = True


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on a free loopback port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_demo(settings: Settings, out: TextIO, *, per_class: int = 20, show: int = 2) -> float:
    """Returns the accuracy on the held-out images."""
    if champion_version(settings.model_dir) is None:
        out.write(f"No model in {settings.model_dir}: training the default CNN on the demo set...\n")

        def show_epoch(e: EpochStats) -> None:
            out.write(f"  epoch {e.epoch}: loss {e.train_loss:.3f}, val accuracy {e.val_accuracy:.3f} "
                      f"({e.seconds:.1f} s)\n")

        result = train(TrainConfig(source="demo"), settings.model_dir, on_epoch=show_epoch, promote=False)
        # The one promotion path, on disk only: the demo's job runs on a private Redis seeded from this directory.
        Champion(settings.model_dir).set(result.version)
        out.write(f"Trained model {result.version}: val accuracy {result.val_accuracy:.3f}\n")
    settings = settings.replace(allow_networks=tuple(sorted({*settings.allow_networks, *LOOPBACK})))
    with tempfile.TemporaryDirectory(prefix="imgq-demo-") as tmp:
        root = Path(tmp)
        files = write_imagefolder(root, split="test", n_per_class=per_class)
        with serve_directory(root) as base:
            truth = {f"{base}/{path.relative_to(root).as_posix()}": label for path, label in files}
            urls = [*truth, f"{base}/missing.jpg"]  # one bad URL: errors are results too
            buf = io.StringIO()
            report = run_job(urls, buf, settings=settings, progress=False, reread=lambda: urls)
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    return _print_table(records, truth, report, out, show)


def _print_table(records: list[dict[str, Any]], truth: dict[str, str], report: RunReport, out: TextIO,
                 show: int) -> float:
    per_class: dict[str, int] = {}
    shown = []
    for rec in records:  # a couple of rows per class, and every error
        key = truth.get(rec["url"], "error")
        per_class[key] = per_class.get(key, 0) + 1
        if key == "error" or per_class[key] <= show:
            shown.append(rec)
    out.write(f"\n{'URL':<56} {'label':<10} {'conf':>6}  expected\n")
    for rec in shown:
        url = rec["url"] if len(rec["url"]) <= 56 else "..." + rec["url"][-53:]
        if rec["error"]:
            out.write(f"{url:<56} {'-':<10} {'':>6}  error {rec['error']['code']}\n")
        else:
            mark = "ok" if rec["label"] == truth.get(rec["url"]) else f"WRONG ({truth.get(rec['url'])})"
            out.write(f"{url:<56} {rec['label']:<10} {rec['confidence']:>6.3f}  {mark}\n")
    scored = [r for r in records if r["url"] in truth]
    correct = sum(1 for r in scored if r["label"] == truth[r["url"]])
    accuracy = correct / len(scored) if scored else 0.0
    out.write(f"\n{report.describe()}\n")
    out.write(f"accuracy on {len(scored)} held-out demo images: {accuracy:.1%} ({correct}/{len(scored)})\n")
    return accuracy
