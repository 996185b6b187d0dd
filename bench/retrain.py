"""How long a retrain of the default CNN on the demo set takes here, and the accuracy it reaches.

Runs the real `imgq train` (the same train-and-gate a queued `imgq retrain` runs on the trainer worker)
in a fresh model directory, so no champion gates it and nothing is cached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from model.registry import list_versions


def measure_retrain(epochs: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="imgq-bench-retrain-") as tmp:
        cmd = [sys.executable, "-m", "cli", "train", "--data", "demo", "--out", tmp]
        if epochs:
            cmd += ["--epochs", str(epochs)]
        env = {**os.environ, "IMGQ_REDIS_URL": "redis://127.0.0.1:1/0"}  # no Redis: disk pointer only
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        (meta,) = list_versions(Path(tmp))
    return {"retrain_demo_cnn_s": round(seconds, 1), "retrain_demo_cnn_val_accuracy": meta.metrics["val_accuracy"],
            "retrain_demo_cnn_epochs": meta.metrics["epochs_run"]}


if __name__ == "__main__":
    print(measure_retrain())
