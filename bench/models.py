"""Untrained checkpoints for the benchmark, published the normal way so workers load them as in production.

Throughput does not depend on what the weights learnt, only on the architecture and input size, so
random initialisation is enough and nothing is downloaded or trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.champion import Champion
from model.demo_data import CLASSES
from model.net import ModelConfig, build_model
from model.pointer import champion_version
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from model.registry import load_champion, publish

# The default CNN at its default 64 px, and resnet18 at the usual 224 px.
BENCH_MODELS: dict[str, ModelConfig] = {
    "cnn": ModelConfig(),
    "resnet18": ModelConfig(arch="resnet18", input_size=224),
}


def ensure_model(name: str, root: Path) -> Path:
    """``root/<name>``, a registry whose champion is an untrained ``BENCH_MODELS[name]``; reused if present."""
    model_dir = root / f"models-{name}"
    if champion_version(model_dir) is None:
        config = BENCH_MODELS[name]
        torch.manual_seed(0)
        module = build_model(config)
        version = publish(model_dir, module, config=config, classes=CLASSES[: config.num_classes],
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, metrics={"note": "untrained, for imgq bench"})
        Champion(model_dir).set(version)
    load_champion(model_dir)  # fail here, not in a worker, if the artifact is bad
    return model_dir
