"""The naive baseline, the way a tutorial classifies a list of URLs: one at a time, nothing overlapped.

Fetch with urllib (a new connection each time), decode the whole image with Pillow, transform, and a
forward pass on a batch of one in a freshly built ``nn.Module``. A tutorial leaves torch's threads at the
default (all cores); on a busy machine that can be far slower than one thread (the threads wait for each
other at every op), so both are run and the naive figure is the better one: the ratio is a lower bound.
"""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from PIL import Image

from model.checkpoint import WEIGHTS_FILE, read_meta
from model.net import build_model
from model.pointer import champion_version
from model.preprocess import Preprocess
from model.registry import version_dir


def measure_naive(model_dir: Path, urls: Sequence[str]) -> dict[int, float]:
    """Images/s classifying ``urls`` one by one, per torch thread count tried."""
    directory = version_dir(model_dir, champion_version(model_dir) or "")
    meta = read_meta(directory)
    module = build_model(meta.config)
    module.load_state_dict(safetensors.torch.load_file(directory / WEIGHTS_FILE))
    module.eval()
    transform = Preprocess(size=meta.input_size, mean=meta.mean, std=meta.std)

    def classify(url: str) -> str:
        with urllib.request.urlopen(url, timeout=30) as resp:
            data = resp.read()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            logits = module(transform.transform(image).unsqueeze(0))  # the torchvision v2 pipeline itself
        return meta.classes[int(logits.argmax(dim=1))]

    default_threads = torch.get_num_threads()
    ips: dict[int, float] = {}
    try:
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            classify(urls[0])  # warm-up
            start = time.perf_counter()
            for url in urls:
                classify(url)
            ips[threads] = len(urls) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(default_threads)
    return ips
